//! Ansible (ansible-core, installed by `cargo xtask setup`) through the
//! agent, with a policy that allows exactly what its modules need.
use std::path::{Path, PathBuf};

use interlock_e2e::*;
use serde_json::Value;

const HOST: &str = "127.0.0.73";
const ANSIBLE: &str = "/opt/interlock-test/ansible/bin";

fn policy(sshd: &Sshd, known_hosts: &Path, rules: &str) -> String {
    format!(
        r#"
[[target]]
name = "app"
protocol = "ssh"
address = "{HOST}:22"
known_hosts = {known_hosts:?}
[target.credential]
user = "{SSH_USER}"
private_key_file = {key:?}
{rules}
"#,
        key = sshd.client_key(),
    )
}

struct Project {
    dir: PathBuf,
}

impl Project {
    fn new(agent: &Agent, config: &Path) -> Self {
        let dir = agent.workdir.join("ansible");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("inventory"),
            format!(
                "[app]\n{HOST} ansible_user={SSH_USER} ansible_python_interpreter=/usr/bin/python3 \
                 ansible_ssh_common_args='-F {}'\n",
                config.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("ansible.cfg"),
            format!(
                "[defaults]\ninventory = {}/inventory\nlocal_tmp = {}/tmp\n\n[ssh_connection]\ncontrol_path_dir = {}/cp\n",
                dir.display(),
                dir.display(),
                dir.display()
            ),
        )
        .unwrap();
        Self { dir }
    }

    fn run(&self, cgroup: &TestCgroup, command: &str) -> std::process::Output {
        cgroup.sh(&format!(
            "cd {} && ANSIBLE_CONFIG={}/ansible.cfg {ANSIBLE}/{command} 2>&1",
            self.dir.display(),
            self.dir.display()
        ))
    }
}

/// What Ansible's modules need, and no more: its temporary directory,
/// these four modules, files over SFTP; `raw` commands on their own merits.
const LEAST_PRIVILEGE: &str = r#"
[[rule]]
name = "ansible"
workloads = ["*"]
targets = ["app"]
decision = "allow"
subsystems = ["sftp"]
commands = [
  "echo *",
  "sleep 0",
  "umask 77",
  "mkdir -p /home/deploy/.ansible/tmp",
  "mkdir -p *",
  "mkdir *",
  "chmod u+rwx /home/deploy/.ansible/tmp/ansible-tmp-*/ /home/deploy/.ansible/tmp/ansible-tmp-*/*",
  "/usr/bin/python3 /home/deploy/.ansible/tmp/ansible-tmp-*/AnsiballZ_ping.py",
  "/usr/bin/python3 /home/deploy/.ansible/tmp/ansible-tmp-*/AnsiballZ_stat.py",
  "/usr/bin/python3 /home/deploy/.ansible/tmp/ansible-tmp-*/AnsiballZ_copy.py",
  "/usr/bin/python3 /home/deploy/.ansible/tmp/ansible-tmp-*/AnsiballZ_command.py",
  "rm -f -r /home/deploy/.ansible/tmp/ansible-tmp-*/",
  "cat /tmp/interlock-ansible-*",
]

[[rule]]
name = "keep-it"
workloads = ["*"]
targets = ["app"]
decision = "deny"
commands = ["rm /tmp/interlock-ansible-keep*"]
"#;

#[test]
fn ansible_runs_with_exactly_what_it_needs() {
    require_root();
    assert!(
        Path::new(ANSIBLE).join("ansible-playbook").exists(),
        "ansible-core is missing (`cargo xtask setup` installs it in {ANSIBLE})"
    );
    let sshd = Sshd::start("ansible", &[HOST]);
    let known_hosts = sshd.known_hosts(&[HOST]);
    let cgroup = TestCgroup::new("ansible");
    // A line per request in the access log too (a SIEM's view).
    let agent = Agent::start_with(
        &cgroup,
        "ansible",
        "access_log_statements = true",
        &policy(&sshd, &known_hosts, LEAST_PRIVILEGE),
    );
    let config = ssh_client_config(&agent);
    let project = Project::new(&agent, &config);
    let pid = std::process::id();
    let keep = format!("/tmp/interlock-ansible-keep-{pid}");
    std::fs::write(&keep, "kept\n").unwrap();
    let _ = std::process::Command::new("chown")
        .args([SSH_USER, &keep])
        .output();

    // Ad-hoc modules.
    let out = project.run(&cgroup, "ansible app -m ping");
    assert!(out.status.success(), "ping: {}", stdout(&out));
    assert!(
        stdout(&out).contains("\"ping\": \"pong\""),
        "{}",
        stdout(&out)
    );
    let copied = format!("/tmp/interlock-ansible-{pid}");
    let out = project.run(
        &cgroup,
        &format!("ansible app -m copy -a 'content=hello dest={copied}'"),
    );
    assert!(out.status.success(), "copy: {}", stdout(&out));
    assert_eq!(std::fs::read_to_string(&copied).unwrap(), "hello");
    let out = project.run(
        &cgroup,
        &format!("ansible app -m shell -a 'wc -c {copied}'"),
    );
    assert!(out.status.success(), "shell: {}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!("5 {copied}")),
        "{}",
        stdout(&out)
    );

    // A module the policy does not name is refused.
    let out = project.run(
        &cgroup,
        &format!("ansible app -m file -a 'path={keep} state=absent'"),
    );
    assert!(!out.status.success(), "file: {}", stdout(&out));
    assert!(
        stdout(&out).contains("AnsiballZ_file.py"),
        "{}",
        stdout(&out)
    );
    assert_eq!(std::fs::read_to_string(&keep).unwrap(), "kept\n");

    // A playbook: its tasks run, and the one that runs a denied command
    // fails with the refusal.
    std::fs::write(
        project.dir.join("site.yml"),
        format!(
            r#"- hosts: app
  gather_facts: false
  tasks:
    - ansible.builtin.ping:
    - ansible.builtin.copy:
        content: "from the playbook\n"
        dest: {copied}
    - ansible.builtin.raw: cat {copied}
      register: shown
    - ansible.builtin.raw: rm -f {keep}
"#
        ),
    )
    .unwrap();
    let out = project.run(&cgroup, "ansible-playbook site.yml");
    let text = stdout(&out);
    assert!(
        !out.status.success(),
        "the denied task fails the play: {text}"
    );
    assert!(text.contains("ok=3"), "three tasks ran: {text}");
    assert!(
        text.contains("keep-it") && text.contains(&format!("denies `rm -f {keep}`")),
        "the refusal is in the task's failure: {text}"
    );
    assert_eq!(
        std::fs::read_to_string(&copied).unwrap(),
        "from the playbook\n"
    );
    assert_eq!(
        std::fs::read_to_string(&keep).unwrap(),
        "kept\n",
        "nothing removed"
    );

    // Every request was decided, and recorded.
    let decided: Vec<Value> = agent
        .all_lines()
        .into_iter()
        .filter(|l| l["event"] == "ssh_request")
        .collect();
    assert!(
        decided
            .iter()
            .any(|l| l["decision"] == "deny" && l["rule"] == "keep-it"),
        "{decided:?}"
    );
    let _ = std::fs::remove_file(&copied);
    let _ = std::fs::remove_file(&keep);
}
