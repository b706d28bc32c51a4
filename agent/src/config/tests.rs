use super::*;
use crate::{policy::GrantSpec, principal::Principal};
use policy::DEFAULT_APPROVAL_TIMEOUT;

fn error_of(text: &str) -> (usize, usize, String) {
    match Config::from_text("bad.toml", text) {
        Err(ConfigError::Invalid {
            line,
            column,
            message,
            ..
        }) => (line, column, message),
        other => panic!("expected an Invalid error, got {other:?}"),
    }
}

#[test]
fn errors_name_line_and_column() {
    let cases: [(&str, usize, usize, &str); 10] = [
        (
            "[agent]\nmode = \"enforce\"\nbogus = 1\n",
            3,
            1,
            "unknown field `bogus`",
        ),
        (
            "[agent]\nmode = \"sometimes\"\n",
            2,
            8,
            "unknown variant `sometimes`",
        ),
        (
            "[[target]]\nname = \"a\"\nprotocol = \"tcp\"\naddress = \"10.0.0.1\"\n",
            4,
            11,
            "has no port",
        ),
        (
            "[[target]]\nname = \"a\"\nprotocol = \"smtp\"\naddress = \"10.0.0.1:25\"\n",
            3,
            12,
            "unknown variant `smtp`",
        ),
        (
            "[[target]]\nname = \"a\"\nprotocol = \"tcp\"\naddress = \"10.0.0.1:1\"\n[[rule]]\nname = \"r\"\nworkloads = [\"ghost\"]\ntargets = [\"a\"]\ndecision = \"allow\"\n",
            7,
            14,
            "unknown workload \"ghost\"",
        ),
        (
            "[[target]]\nname = \"a\"\nprotocol = \"tcp\"\naddress = \"10.0.0.1:1\"\n[[target]]\nname = \"a\"\nprotocol = \"tcp\"\naddress = \"10.0.0.2:1\"\n",
            6,
            8,
            "target \"a\" is defined twice",
        ),
        ("[[workload]]\nname = \"w\"\n", 1, 1, "selects nothing"),
        (
            "[[target]]\nname = \"a\"\nprotocol = \"ssh\"\naddress = \"10.0.0.1:22\"\n",
            1,
            1,
            "needs a [target.credential]",
        ),
        (
            "[[target]]\nname = \"a\"\nprotocol = \"tcp\"\naddress = \"10.0.0.1:1\"\n[[workload]]\nname = \"w\"\nuid = 1\n[[rule]]\nname = \"r\"\nworkloads = [\"w\"]\ntargets = [\"a\"]\ndecision = \"allow\"\ncommands = [\"true\"]\n",
            13,
            12,
            "apply to ssh targets",
        ),
        (
            "[agent]\ncgroup = \"relative/path\"\n",
            2,
            10,
            "absolute path",
        ),
    ];
    for (text, line, column, needle) in cases {
        let (l, c, message) = error_of(text);
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
        assert_eq!((l, c), (line, column), "location of {needle:?} ({message})");
    }
}

#[test]
fn display_leads_with_file_line_column() {
    let error = Config::from_text("/etc/interlock/x.toml", "[agent]\nmode = 3\n").unwrap_err();
    assert!(
        error.to_string().starts_with("/etc/interlock/x.toml:2:8: "),
        "{error}"
    );
}

#[test]
fn policy_dir_is_merged_and_checked_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let policy_dir = dir.path().join("policy.d");
    std::fs::create_dir(&policy_dir).unwrap();
    let main = dir.path().join("interlock.toml");
    std::fs::write(&main, format!("[agent]\npolicy_dir = {:?}\n[[target]]\nname = \"cache\"\nprotocol = \"tcp\"\naddress = \"10.0.0.1:7000\"\n", policy_dir)).unwrap();
    std::fs::write(
        policy_dir.join("10-workloads.toml"),
        "[[workload]]\nname = \"ci\"\nunit = \"ci.service\"\n",
    )
    .unwrap();
    std::fs::write(policy_dir.join("20-rules.toml"), "[[rule]]\nname = \"r\"\nworkloads = [\"ci\"]\ntargets = [\"cache\"]\ndecision = \"allow\"\n").unwrap();
    std::fs::write(policy_dir.join("README.md"), "ignored").unwrap();
    let config = Config::load(&main).unwrap();
    assert_eq!(config.sources.len(), 3);
    assert_eq!(config.policy.rules.len(), 1);

    std::fs::write(policy_dir.join("30-bad.toml"), "[[rule]]\nname = \"r2\"\nworkloads = [\"ci\"]\ntargets = [\"nope\"]\ndecision = \"allow\"\n").unwrap();
    let error = Config::load(&main).unwrap_err().to_string();
    assert!(
        error.contains("30-bad.toml:4:12: unknown target \"nope\""),
        "{error}"
    );

    std::fs::write(
        policy_dir.join("30-bad.toml"),
        "[agent]\nmode = \"audit\"\n",
    )
    .unwrap();
    let error = Config::load(&main).unwrap_err().to_string();
    assert!(
        error.contains("30-bad.toml:1:1:") && error.contains("main configuration file"),
        "{error}"
    );
}

#[test]
fn a_cached_bundle_joins_the_policy_only_while_its_signature_holds() {
    use ed25519_dalek::SigningKey;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let key = SigningKey::from_bytes(&[9; 32]);
    let other = SigningKey::from_bytes(&[10; 32]);
    let main = dir.path().join("interlock.toml");
    std::fs::write(
        &main,
        format!(
            "[agent]\nstate_dir = {state:?}\n[policy_source]\nurl = \"s3://fleet/policy/\"\n\
             trusted_keys = [{:?}]\n",
            bundle::key_id(&key.verifying_key())
        ),
    )
    .unwrap();
    let config = Config::load(&main).unwrap();
    assert!(config.bundle.is_none() && config.policy.targets.is_empty());

    let manifest = |text: &str| bundle::Manifest {
        format: 1,
        version: "v1".into(),
        serial: 1,
        signed_at: "2026-11-30T00:00:00Z".into(),
        files: vec![bundle::BundleFile {
            name: "10-svc.toml".into(),
            text: text.into(),
        }],
    };
    let good = "[[target]]\nname = \"svc\"\nprotocol = \"tcp\"\naddress = \"10.0.0.1:7000\"\n";
    let cache = PolicySourceSettings::cache_path(&state);
    std::fs::write(&cache, bundle::sign(&key, &manifest(good))).unwrap();
    let config = Config::load(&main).unwrap();
    assert_eq!(config.bundle.unwrap().manifest.version, "v1");
    assert_eq!(config.policy.targets[0].name, "svc");
    assert!(config.sources.contains(&cache));

    // Errors in a bundle's file name the bundle, the file, line and column.
    let bad = "[[target]]\nname = \"svc\"\nprotocol = \"tcp\"\naddress = \"10.0.0.1\"\n";
    std::fs::write(&cache, bundle::sign(&key, &manifest(bad))).unwrap();
    let error = Config::load(&main).unwrap_err().to_string();
    assert!(
        error.starts_with("policy bundle v1/10-svc.toml:4:11:"),
        "{error}"
    );
    let agent = "[agent]\nmode = \"audit\"\n";
    std::fs::write(&cache, bundle::sign(&key, &manifest(agent))).unwrap();
    let error = Config::load(&main).unwrap_err().to_string();
    assert!(error.contains("not in a policy bundle"), "{error}");

    // Signed by a key the configuration does not trust: an error, never
    // a quiet fallback to the local files alone.
    std::fs::write(&cache, bundle::sign(&other, &manifest(good))).unwrap();
    let error = Config::load(&main).unwrap_err().to_string();
    assert!(error.contains("not signed by a trusted key"), "{error}");
}

#[test]
fn policy_source_settings_are_checked() {
    let key = "ed25519:O2onvM62pC1io6jQKm8Nc2UyFXcd4kOmOsBIoYtZ2ik=";
    for (text, wanted) in [
        (
            format!("[policy_source]\nurl = \"https://x/\"\ntrusted_keys = [{key:?}]\n"),
            (2, 7, "must start with one of"),
        ),
        (
            "[policy_source]\nurl = \"s3://b/p/\"\ntrusted_keys = []\n".into(),
            (3, 16, "at least one key"),
        ),
        (
            "[policy_source]\nurl = \"s3://b/p/\"\ntrusted_keys = [\"ed25519:AAAA\"]\n".into(),
            (3, 17, "not 32 bytes"),
        ),
        (
            format!(
                "[policy_source]\nurl = \"s3://b/p/\"\ngit_ref = \"main\"\ntrusted_keys = [{key:?}]\n"
            ),
            (3, 11, "git_ref is for git+"),
        ),
    ] {
        let (line, column, message) = error_of(&text);
        assert_eq!((line, column), (wanted.0, wanted.1), "{message}");
        assert!(message.contains(wanted.2), "{message}");
    }
}

#[test]
fn defaults_and_admins() {
    let config = Config::from_text(
        "x.toml",
        "[agent]\nadmins = [\"root\", \"group:interlock-admins\", \"uid:1001\"]\n",
    )
    .unwrap();
    assert_eq!(config.agent.mode, Mode::Enforce);
    assert_eq!(config.agent.cgroup, CgroupSetting::Auto);
    assert_eq!(
        config.agent.admins,
        [
            Principal::User("root".into()),
            Principal::Group("interlock-admins".into()),
            Principal::Uid(1001)
        ]
    );
    assert!(config.policy.targets.is_empty());
    let (line, column, message) = error_of("[agent]\nadmins = [\"root\", \"group:\"]\n");
    assert_eq!((line, column), (2, 19), "{message}");
}

/// The local CA's extra names, each checked where it is written; with the
/// targets' own, they are its scope.
#[test]
fn ca_names_are_checked_and_join_the_targets_names() {
    let config = Config::from_text(
        "x.toml",
        "[agent]\nca_names = [\"API.internal\", \"10.0.0.0/8\"]\n\n\
         [[target]]\nname = \"db\"\nprotocol = \"tcp\"\naddress = \"192.0.2.7:5432\"\n",
    )
    .unwrap();
    let scope = crate::tls::CaScope::of(&config);
    for name in ["api.internal", "k8s.api.internal", "10.9.9.9", "192.0.2.7"] {
        assert!(scope.covers(name), "{name}");
    }
    for name in ["192.0.2.8", "example.com"] {
        assert!(!scope.covers(name), "{name}");
    }
    let (line, column, message) = error_of("[agent]\nca_names = [\"ok.test\", \"*.test\"]\n");
    assert_eq!((line, column), (2, 24), "{message}");
    assert!(message.contains("no wildcards"), "{message}");
}

/// Every shipped example parses, and its rules evaluate.
#[test]
fn policy_examples_load_and_evaluate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy-examples");
    // The files the examples name under /etc/interlock, made here (a key
    // of the test's own, root 0600, and an empty known_hosts).
    let files = tempfile::tempdir().unwrap();
    let key = files.path().join("deploy_ed25519");
    let pem = russh::keys::PrivateKey::from(
        russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[1; 32]),
    )
    .to_openssh(russh::keys::ssh_key::LineEnding::LF)
    .unwrap();
    std::fs::write(&key, pem.as_bytes()).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let known_hosts = files.path().join("known_hosts");
    std::fs::write(&known_hosts, "").unwrap();
    let password = files.path().join("app-db");
    std::fs::write(&password, "secret\n").unwrap();
    std::fs::set_permissions(
        &password,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let ca = files.path().join("internal-ca.pem");
    std::fs::write(&ca, "").unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace(
                "/etc/interlock/secrets/deploy_ed25519",
                key.to_str().unwrap(),
            )
            .replace(
                "/etc/interlock/upstream_known_hosts",
                known_hosts.to_str().unwrap(),
            )
            .replace("/etc/interlock/secrets/app-db", password.to_str().unwrap())
            .replace(
                "/etc/interlock/secrets/orders-api-token",
                password.to_str().unwrap(),
            )
            .replace("/etc/interlock/internal-ca.pem", ca.to_str().unwrap())
            .replace(
                "/etc/interlock/secrets/staging-deployer-token",
                password.to_str().unwrap(),
            )
            .replace(
                "/etc/interlock/staging-cluster-ca.pem",
                ca.to_str().unwrap(),
            );
        let config =
            Config::from_text(&path.display().to_string(), &text).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            !config.policy.targets.is_empty(),
            "{} has targets",
            path.display()
        );
        assert!(
            !config.policy.rules.is_empty(),
            "{} has rules",
            path.display()
        );
        let anyone = crate::workload::Workload::default();
        for i in 0..config.policy.targets.len() {
            let verdict =
                crate::policy::evaluate(&config.policy, &anyone, crate::policy::TargetId(i));
            assert!(!verdict.reason.is_empty());
        }
        seen += 1;
    }
    assert!(
        seen >= 3,
        "expected the shipped examples in {}",
        dir.display()
    );
}

#[test]
fn postgres_targets_need_a_private_credential() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("pw");
    std::fs::write(&secret, "pw\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let target = |credential: &str| {
        format!(
            "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"10.0.0.1:5432\"\n{credential}"
        )
    };
    let (line, column, message) = error_of(&target(""));
    assert_eq!((line, column), (1, 1), "{message}");
    assert!(message.contains("needs a [target.credential]"), "{message}");

    let with_file = target(&format!(
        "[target.credential]\nuser = \"app\"\npassword_file = {:?}\n",
        secret.display().to_string()
    ));
    let (line, _, message) = error_of(&with_file);
    assert_eq!(line, 7, "{message}");
    assert!(
        message.contains("must be owned by root with mode 0600") && message.contains("0644"),
        "{message}"
    );

    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Owned by the user running the tests, whom they expect as the owner.
    let loaded = Config::from_text("ok.toml", &with_file).unwrap();
    assert_eq!(
        loaded.policy.targets[0].credential.as_ref().unwrap().user,
        "app"
    );
    let password = loaded.policy.targets[0].credential.as_ref().unwrap();
    assert!(!format!("{password:?}").contains("pw"), "never printed");

    let (line, _, message) = error_of(
        "[[target]]\nname = \"t\"\nprotocol = \"tcp\"\naddress = \"10.0.0.1:1\"\ntls = \"require\"\n",
    );
    assert_eq!(line, 5, "{message}");
    assert!(message.contains("tls applies to protocol"), "{message}");
    let (_, _, message) = error_of(
        "[[target]]\nname = \"t\"\nprotocol = \"tcp\"\naddress = \"10.0.0.1:1\"\n[[rule]]\nname = \"r\"\nworkloads = [\"*\"]\ntargets = [\"t\"]\ndecision = \"allow\"\nstatements = [\"select\"]\n",
    );
    assert!(message.contains("apply to postgres targets"), "{message}");
    let (_, _, message) = error_of(
        "[[rule]]\nname = \"r\"\nworkloads = [\"*\"]\ntargets = [\"*\"]\ndecision = \"allow\"\nstatements = [\"selec\"]\n",
    );
    assert!(message.contains("unknown variant `selec`"), "{message}");
}

#[test]
fn sessions_and_shipper_settings() {
    let config = Config::from_text(
        "t.toml",
        "[sessions]\nmax_store_bytes = \"512MiB\"\nretention = \"2d\"\n\
         [shipper]\nurl = \"s3://audit/interlock\"\nendpoint = \"http://127.0.0.1:3900\"\npart_interval = \"1m\"\n\
         [[target]]\nname = \"t\"\nprotocol = \"tcp\"\naddress = \"10.0.0.1:80\"\nrecord = \"full\"\n",
    )
    .unwrap();
    assert_eq!(config.sessions.max_store_bytes, 512 << 20);
    assert_eq!(
        config.sessions.retention,
        std::time::Duration::from_secs(2 * 86400)
    );
    let shipper = config.shipper.unwrap();
    assert_eq!(shipper.url, "s3://audit/interlock");
    assert_eq!(shipper.part_interval, std::time::Duration::from_secs(60));
    assert_eq!(
        config.policy.targets[0].record,
        crate::policy::RecordMode::Full
    );
    let defaults = Config::from_text("t.toml", "").unwrap();
    assert_eq!(defaults.sessions.max_store_bytes, 2 << 30);
    assert!(defaults.shipper.is_none());

    let (line, column, message) = error_of("[sessions]\nmax_store_bytes = \"2XB\"\n");
    assert_eq!((line, column), (2, 19), "{message}");
    assert!(message.contains("unknown size unit"), "{message}");
    let (line, column, message) = error_of("[shipper]\nurl = \"http://x\"\n");
    assert_eq!((line, column), (2, 7), "{message}");
    let (line, _, message) = error_of(
        "[[target]]\nname = \"t\"\nprotocol = \"tcp\"\naddress = \"10.0.0.1:80\"\nrecord = \"everything\"\n",
    );
    assert_eq!(line, 5, "{message}");
}

#[test]
fn approval_fields_are_checked_where_they_are_written() {
    const BASE: &str = "[[target]]\nname = \"t\"\nprotocol = \"tcp\"\naddress = \"10.0.0.1:80\"\n\
        [[workload]]\nname = \"w\"\nuid = 1\n\
        [[rule]]\nname = \"r\"\nworkloads = [\"w\"]\ntargets = [\"t\"]\n";
    let rule = |rest: &str| format!("{BASE}{rest}");
    let config = Config::from_text(
        "t.toml",
        &rule("decision = \"approve\"\napprovers = [\"uid:7\"]\n"),
    )
    .unwrap();
    let spec = config.policy.rules[0].approval.clone().unwrap();
    assert_eq!(spec.min_approvals, 1);
    assert_eq!(spec.timeout, DEFAULT_APPROVAL_TIMEOUT);
    assert_eq!(spec.grant, GrantSpec::Once);

    let (line, _, message) = error_of(&rule("decision = \"approve\"\n"));
    assert_eq!(line, 8, "{message}");
    assert!(message.contains("needs approvers"), "{message}");
    let (line, column, message) = error_of(&rule("decision = \"allow\"\ngrant = \"30m\"\n"));
    assert_eq!((line, column), (13, 9), "{message}");
    assert!(
        message.contains("apply to decision = \"approve\""),
        "{message}"
    );
    let (line, column, message) = error_of(&rule(
        "decision = \"approve\"\napprovers = [\"alice\", \"webhook:\"]\n",
    ));
    assert_eq!((line, column), (13, 23), "{message}");
    let (line, _, message) = error_of(&rule(
        "decision = \"approve\"\napprovers = [\"alice\"]\ngrant = \"forever\"\n",
    ));
    assert_eq!(line, 14, "{message}");
    assert!(message.contains("\"once\" or a duration"), "{message}");
    let (line, _, message) = error_of(&rule(
        "decision = \"approve\"\napprovers = [\"alice\"]\nmin_approvals = 0\n",
    ));
    assert_eq!(line, 14, "{message}");
    let config = Config::from_text(
        "t.toml",
        &rule("decision = \"approve\"\napprovers = [\"uid:7\"]\nrequestable = true\nmax_duration = \"2h\"\n"),
    )
    .unwrap();
    let spec = config.policy.rules[0].approval.clone().unwrap();
    assert_eq!(spec.requestable, Some(std::time::Duration::from_secs(7200)));
    let (line, _, message) = error_of(&rule(
        "decision = \"approve\"\napprovers = [\"alice\"]\nrequestable = true\n",
    ));
    assert_eq!(line, 14, "{message}");
    assert!(message.contains("needs max_duration"), "{message}");
    let (line, _, message) = error_of(&rule(
        "decision = \"approve\"\napprovers = [\"alice\"]\nmax_duration = \"1h\"\n",
    ));
    assert_eq!(line, 14, "{message}");
    assert!(message.contains("requestable = true"), "{message}");

    let (line, column, message) =
        error_of("[approvals]\nwebhook_url = \"http://chat.example.com/hook\"\n");
    assert_eq!((line, column), (2, 15), "{message}");
    assert!(message.contains("https://"), "{message}");
    let (line, _, message) = error_of("[approvals]\ncallback_listen = \"127.0.0.1:9956\"\n");
    assert_eq!(line, 2, "{message}");
    assert!(message.contains("token_file"), "{message}");
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let text = format!(
        "[approvals]\ncallback_listen = \"127.0.0.1:9956\"\ntoken_file = \"{}\"\n",
        token.display()
    );
    let (line, _, message) = error_of(&text);
    assert_eq!(line, 3, "{message}");
    assert!(message.contains("mode 0600"), "{message}");
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let config = Config::from_text("t.toml", &text).unwrap();
    assert_eq!(config.approvals.token.unwrap().expose(), "t0ken");
}

#[test]
fn masks_that_cannot_apply_to_a_target_are_refused_at_load() {
    let files = tempfile::tempdir().unwrap();
    let private = |name: &str, text: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        path
    };
    let pem = russh::keys::PrivateKey::from(
        russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&[1; 32]),
    )
    .to_openssh(russh::keys::ssh_key::LineEnding::LF)
    .unwrap();
    let key = private("key", &pem);
    let known_hosts = private("known_hosts", "");
    let password = private("pw", "pw\n");
    let policy = |targets: &str, mask: &str| {
        format!(
            "[[target]]\nname = \"box\"\nprotocol = \"ssh\"\naddress = \"10.0.0.1:22\"\nknown_hosts = {known_hosts:?}\n\
             [target.credential]\nuser = \"deploy\"\nprivate_key_file = {key:?}\n\
             [[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"10.0.0.2:5432\"\n\
             [target.credential]\nuser = \"app\"\npassword_file = {password:?}\n\
             [[rule]]\nname = \"r\"\nworkloads = [\"*\"]\ntargets = {targets}\ndecision = \"allow\"\nmask = [{mask}]\n"
        )
    };
    // A column mask on a rule that reaches an SSH target would be dropped
    // there: refused, pointing at the mask.
    let text = policy(
        "[\"db\", \"box\"]",
        "{ pattern = \"email\" }, { column = \"customers.email\" }",
    );
    let (line, column, message) = error_of(&text);
    let mask_line = text.lines().position(|l| l.starts_with("mask")).unwrap();
    let at = text
        .lines()
        .nth(mask_line)
        .unwrap()
        .find("{ column")
        .unwrap();
    assert_eq!((line, column), (mask_line + 1, at + 1), "{message}");
    assert!(
        message.contains("a column mask applies to postgres targets"),
        "{message}"
    );
    assert!(message.contains("\"box\" is not one"), "{message}");
    // Patterns apply to both; a column mask to a PostgreSQL target alone.
    Config::from_text(
        "ok.toml",
        &policy("[\"db\", \"box\"]", "{ pattern = \"email\" }"),
    )
    .unwrap();
    Config::from_text(
        "ok.toml",
        &policy("[\"db\"]", "{ column = \"customers.email\" }"),
    )
    .unwrap();
}

#[test]
fn http_targets_hold_one_credential_and_rules_read_requests() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let token = token.display().to_string();
    let target = |credential: &str| {
        format!(
            "[[target]]\nname = \"api\"\nprotocol = \"http\"\naddress = \"10.0.0.1:443\"\n{credential}"
        )
    };
    let loaded = Config::from_text(
        "ok.toml",
        &target(&format!(
            "[target.credential]\nbearer_token_file = {token:?}\n"
        )),
    )
    .unwrap();
    let held = loaded.policy.targets[0].http.as_ref().unwrap();
    assert!(!format!("{held:?}").contains("t0ken"), "never printed");
    let crate::policy::HttpCredential {
        name,
        value,
        secret,
    } = &**held;
    assert_eq!(&secret[..], b"t0ken");
    assert_eq!(
        (name.as_str(), value.to_str().unwrap()),
        ("authorization", "Bearer t0ken")
    );
    assert!(value.is_sensitive());
    let basic = Config::from_text(
        "ok.toml",
        &target(&format!(
            "[target.credential]\nuser = \"ci\"\npassword_file = {token:?}\n"
        )),
    )
    .unwrap();
    let crate::policy::HttpCredential { value, .. } =
        &**basic.policy.targets[0].http.as_ref().unwrap();
    assert_eq!(value.to_str().unwrap(), "Basic Y2k6dDBrZW4=");
    let header = Config::from_text(
        "ok.toml",
        &target(&format!(
            "[target.credential]\nheader = \"X-Api-Key\"\nvalue_file = {token:?}\n"
        )),
    )
    .unwrap();
    let crate::policy::HttpCredential { name, .. } =
        &**header.policy.targets[0].http.as_ref().unwrap();
    assert_eq!(name.as_str(), "x-api-key");
    // Two at once, or half of one, is refused where it is written.
    let (line, _, message) = error_of(&target(&format!(
        "[target.credential]\nbearer_token_file = {token:?}\nheader = \"X\"\nvalue_file = {token:?}\n"
    )));
    assert_eq!(line, 5, "{message}");
    assert!(message.contains("one of"), "{message}");
    let (_, _, message) = error_of(&target("[target.credential]\nuser = \"ci\"\n"));
    assert!(message.contains("one of"), "{message}");
    assert!(Config::from_text("ok.toml", &target("tls = \"disable\"\n")).is_ok());
    let (_, _, message) = error_of(&target(&format!(
        "[target.credential]\nclient_certificate_file = {token:?}\n"
    )));
    assert!(message.contains("go together"), "{message}");
    let (_, _, message) = error_of(&target(&format!(
        "[target.credential]\nclient_certificate_file = {token:?}\nclient_key_file = {token:?}\n"
    )));
    assert!(
        message.contains("is not a PEM certificate chain"),
        "{message}"
    );

    let rule = |fields: &str| {
        format!(
            "{}[[rule]]\nname = \"r\"\nworkloads = [\"*\"]\ntargets = [\"api\"]\ndecision = \"allow\"\n{fields}",
            target("")
        )
    };
    let loaded = Config::from_text(
        "ok.toml",
        &rule("methods = [\"get\"]\npaths = [\"/api/**\"]\nhosts = [\"API.example.com\"]\n"),
    )
    .unwrap();
    let http = &loaded.policy.rules[0].http;
    assert_eq!(http.methods, ["GET"]);
    assert!(http.hosts[0].matches("api.example.com"));
    let (line, _, message) = error_of(&rule("paths = [\"api/**\"]\n"));
    assert_eq!(line, 10, "{message}");
    assert!(message.contains("must start with /"), "{message}");
    let (_, _, message) = error_of(&rule("methods = [\"GET /\"]\n"));
    assert!(message.contains("is not a method"), "{message}");
    let (_, _, message) = error_of(
        "[[target]]\nname = \"t\"\nprotocol = \"tcp\"\naddress = \"10.0.0.1:1\"\n[[rule]]\nname = \"r\"\nworkloads = [\"*\"]\ntargets = [\"t\"]\ndecision = \"allow\"\npaths = [\"/x\"]\n",
    );
    assert!(
        message.contains("apply to http and kubernetes targets"),
        "{message}"
    );
    let (_, _, message) = error_of(&rule("verbs = [\"get\"]\n"));
    assert!(message.contains("apply to kubernetes targets"), "{message}");

    // An http target masks JSON values and text, on the target or an
    // allow rule; what it cannot read is refused where it is written.
    let loaded = Config::from_text(
        "ok.toml",
        &rule("mask = [{ json = \"password\" }, { json = \"$.items[*].token\", strategy = \"null\" }, { pattern = \"email\" }]\n"),
    )
    .unwrap();
    assert_eq!(loaded.policy.rules[0].masks.len(), 3);
    Config::from_text(
        "ok.toml",
        &target("mask = [{ json = \"token\" }, { regex = \"tok-[0-9]+\" }]\n"),
    )
    .unwrap();
    for (mask, why) in [
        (
            "{ column = \"email\" }",
            "an http target masks by json, pattern or regex",
        ),
        ("{ json = \"$..token\" }", "a path takes .name"),
        (
            "{ json = \"token\", strategy = \"hash\" }",
            "a json mask redacts or nulls",
        ),
        ("{ json = \"token\", column = \"x\" }", "exactly one of"),
    ] {
        let (line, column, message) = error_of(&target(&format!("mask = [{mask}]\n")));
        assert_eq!((line, column), (5, 9), "{mask}: {message}");
        assert!(message.contains(why), "{mask}: {message}");
    }
    let (_, _, message) = error_of(&rule("mask = [{ column = \"x\" }]\n"));
    assert!(
        message.contains("a column mask applies to postgres targets"),
        "{message}"
    );
    let (_, _, message) = error_of(&format!(
        "[[target]]\nname = \"t\"\nprotocol = \"postgres\"\naddress = \"10.0.0.1:1\"\nmask = [{{ json = \"x\" }}]\n\
         [target.credential]\nuser = \"app\"\npassword_file = {token:?}\n"
    ));
    assert!(message.contains("a json mask applies to http"), "{message}");
}

#[test]
fn kubernetes_rules_name_verbs_resources_and_namespaces() {
    let text = |fields: &str| {
        format!(
            "[[target]]\nname = \"k\"\nprotocol = \"kubernetes\"\naddress = \"10.0.0.1:6443\"\n\
             [[rule]]\nname = \"r\"\nworkloads = [\"*\"]\ntargets = [\"k\"]\ndecision = \"allow\"\n{fields}"
        )
    };
    let loaded = Config::from_text(
        "ok.toml",
        &text("verbs = [\"GET\", \"list\"]\nresources = [\"pods\", \"apps/*\"]\nnamespaces = [\"ci-*\"]\n"),
    )
    .unwrap();
    let kube = &loaded.policy.rules[0].kube;
    assert_eq!(kube.verbs, ["get", "list"]);
    assert!(kube.resources[1].matches("apps/deployments"));
    assert!(kube.namespaces[0].matches("ci-7"));
    let (line, _, message) = error_of(&text("verbs = [\"read\"]\n"));
    assert_eq!(line, 10, "{message}");
    assert!(message.contains("is not one of"), "{message}");
}
