#!/bin/bash
# Runs the Kubernetes checks of tests/tests/kubernetes.rs against a real
# cluster (k3s, single node), by hand, in the `k3s` Vagrant box:
#
#   cd vagrant && vagrant up k3s          # provisions, then runs this
#   vagrant ssh k3s -c 'sudo /interlock/vagrant/k3s-check.sh'
#
# Real kubectl, in a job's systemd unit inside ci.slice (the only cgroup
# the agent intercepts here, so k3s's own clients of its API are left
# alone), with the kubeconfig `interlock kube config` writes; the agent
# holds a service account's token. Each check says what it expects and
# the script stops at the first that does not hold.
set -euo pipefail

BIN=${INTERLOCK_BIN:-/interlock/target/release/interlock}
WORK=/var/tmp/interlock-k3s
ADMIN="k3s kubectl"
mkdir -p "$WORK"
chmod 700 "$WORK"

pass() { echo "ok   $*"; }
fail() { echo "FAIL $*" >&2; exit 1; }

# --- The cluster: a namespace with a pod that serves HTTP, a Secret, a
# service account whose token the agent holds.
$ADMIN apply -f - <<'YAML'
apiVersion: v1
kind: Namespace
metadata: {name: ci}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: ci}
spec:
  containers:
  - name: web
    image: registry.k8s.io/e2e-test-images/agnhost:2.52
    args: ["netexec", "--http-port=8080"]
    ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Secret
metadata: {name: db, namespace: ci}
stringData: {password: hunter2}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: interlock, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: interlock-admin}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}
subjects: [{kind: ServiceAccount, name: interlock, namespace: kube-system}]
YAML
$ADMIN -n ci wait --for=condition=Ready pod/web --timeout=300s
(umask 077; $ADMIN -n kube-system create token interlock --duration=24h > "$WORK/token")

# --- The agent: intercepting ci.slice only.
cat > /etc/systemd/system/ci.slice <<'UNIT'
[Unit]
Description=CI jobs (intercepted by Interlock)
UNIT
systemctl daemon-reload
systemctl start ci.slice
CGROUP=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)/ci.slice
cat > "$WORK/interlock.toml" <<TOML
[agent]
state_dir = "$WORK/state"
admin_socket = "$WORK/admin.sock"
bpffs_dir = "/sys/fs/bpf/interlock-k3s"
cgroup = "$CGROUP"

[[target]]
name = "cluster"
protocol = "kubernetes"
address = "127.0.0.1:6443"
tls_ca_file = "/var/lib/rancher/k3s/server/tls/server-ca.crt"
record = "full"
[target.credential]
bearer_token_file = "$WORK/token"

[[workload]]
name = "ci-jobs"
unit = "ci-job-*.service"

[[rule]]
name = "ci-works-in-its-namespace"
workloads = ["ci-jobs"]
targets = ["cluster"]
decision = "allow"
verbs = ["get", "list", "watch", "exec", "portforward"]
resources = ["pods", "pods/log", "pods/exec", "pods/portforward", "secrets"]
namespaces = ["ci"]

[[rule]]
name = "no-deletes"
workloads = ["ci-jobs"]
targets = ["cluster"]
decision = "deny"
verbs = ["delete", "deletecollection"]
TOML
"$BIN" policy check "$WORK/interlock.toml"
"$BIN" run --config "$WORK/interlock.toml" > "$WORK/agent.log" 2>&1 &
AGENT=$!
trap 'kill $AGENT 2>/dev/null; wait $AGENT 2>/dev/null; "$BIN" detach --config "$WORK/interlock.toml" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 100); do
  "$BIN" status --config "$WORK/interlock.toml" >/dev/null 2>&1 && break
  sleep 0.1
done
"$BIN" kube config --config "$WORK/interlock.toml" --target cluster --namespace ci > "$WORK/kubeconfig"
grep -q insecure-skip-tls-verify "$WORK/kubeconfig" && fail "the kubeconfig skips TLS verification"

# A job: one command in its own unit in ci.slice.
job() {
  systemd-run --quiet --wait --pipe --collect --slice ci.slice \
    --unit "ci-job-$RANDOM$RANDOM" -E HOME="$WORK" -E KUBECONFIG="$WORK/kubeconfig" -- "$@"
}

# --- The checks.
[ "$(job kubectl get pods -o name)" = "pod/web" ] && pass "get pods" || fail "get pods"
[ "$(job kubectl get pod web -o 'jsonpath={.status.phase}')" = "Running" ] && pass "get pod" || fail "get pod"
job kubectl logs web >/dev/null && pass "logs" || fail "logs"
out=$(job kubectl get secret db -o 'jsonpath={.data.password}')
[ "$out" = "KioqKg==" ] && pass "Secret value masked" || fail "Secret value: $out"
out=$(job kubectl get pods -n kube-system 2>&1 || true)
grep -q Forbidden <<<"$out" && pass "other namespace refused" || fail "other namespace: $out"
out=$(job kubectl delete pod web 2>&1 || true)
grep -q 'no-deletes' <<<"$out" && pass "delete refused" || fail "delete: $out"
$ADMIN -n ci get pod web >/dev/null && pass "the pod is still there" || fail "the pod is gone"
[ "$(job kubectl exec web -- echo hello)" = "hello" ] && pass "exec" || fail "exec"
out=$(job timeout 75 kubectl get pods --watch --request-timeout=0 2>&1 || true)
grep -q web <<<"$out" && pass "a watch stayed open 75 s" || fail "watch: $out"

# A port-forward, in kubectl's default framing and in bare SPDY.
for env in "" "KUBECTL_PORT_FORWARD_WEBSOCKETS=false"; do
  job env $env kubectl port-forward pod/web 18080:8080 > "$WORK/forward.log" 2>&1 &
  for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:18080/ && break; sleep 0.2; done
  [ "$(curl -s http://127.0.0.1:18080/hostname)" = "web" ] && pass "port-forward ${env:-(WebSocket)}" \
    || fail "port-forward ${env:-(WebSocket)}: $(cat "$WORK/forward.log")"
  systemctl kill --signal=TERM 'ci-job-*.service' 2>/dev/null || true
  wait || true
done

# --- What was recorded.
sessions=$("$BIN" sessions list --config "$WORK/interlock.toml" --json | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
shown=$(for id in $sessions; do "$BIN" sessions show --config "$WORK/interlock.toml" "$id"; done)
grep -q 'delete pods web in ci' <<<"$shown" && pass "the delete is recorded" || fail "no delete recorded"
grep -q 'port-forward to port 8080' <<<"$shown" && pass "port-forward connections recorded" \
  || fail "no port-forward recorded"
echo "all checks passed"
