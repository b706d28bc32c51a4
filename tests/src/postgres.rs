//! A throwaway PostgreSQL 15 cluster on a loopback address.
use super::*;

/// A real PostgreSQL 15 cluster of the test's own, on a loopback address,
/// with SCRAM-SHA-256 for TCP logins and trust on its private Unix socket
/// (which only the harness uses, to set up and inspect).
pub struct Postgres {
    pub addr: SocketAddr,
    dir: PathBuf,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl Postgres {
    pub fn start(name: &str, ip: &str) -> Self {
        Self::start_with(name, ip, false)
    }

    /// With `tls`, the server also speaks TLS, with a certificate for `ip`
    /// from a CA of the test's own (see [`Postgres::ca_file`]).
    pub fn start_with(name: &str, ip: &str, tls: bool) -> Self {
        require_root();
        assert!(
            Path::new(PG_BIN).join("postgres").exists(),
            "PostgreSQL 15 server binaries are missing in {PG_BIN} (`cargo xtask setup` installs them)"
        );
        let dir = std::env::temp_dir().join(format!("interlock-pg-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
        run_ok(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir),
        );
        let data = dir.join("data");
        run_ok(&mut as_postgres(&format!(
            "{PG_BIN}/initdb -D {} -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null",
            data.display()
        )));
        let mut options = format!("-c listen_addresses={ip} -p {port} -k {}", dir.display());
        if tls {
            let d = dir.display();
            run_ok(&mut as_postgres(&format!(
                "cd {d} && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=interlock-test-ca 2>/dev/null \
                 && openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN={ip} 2>/dev/null \
                 && printf 'subjectAltName=IP:{ip}\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext.cnf \
                 && openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile ext.cnf 2>/dev/null \
                 && chmod 600 server.key"
            )));
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={d}/server.crt -c ssl_key_file={d}/server.key"
            ));
        }
        run_ok(&mut as_postgres(&format!(
            "{PG_BIN}/pg_ctl -D {} -l {}/log -w -o \"{options}\" start >/dev/null",
            data.display(),
            dir.display(),
        )));
        Self { addr, dir }
    }

    /// Runs SQL as the superuser over the private socket; returns stdout.
    pub fn admin_sql(&self, database: &str, sql: &str) -> String {
        let out = Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                "psql",
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
            ])
            .args([
                "-h",
                &self.dir.display().to_string(),
                "-p",
                &self.addr.port().to_string(),
                "-d",
                database,
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "admin SQL failed: {sql}\n{}",
            stderr(&out)
        );
        stdout(&out)
    }

    /// The CA that signed the server's certificate (with `start_with(.., true)`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The directory of its Unix socket (for tools run as `postgres`).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a password file the way the agent insists on (root, 0600).
    pub fn password_file(&self, password: &str) -> PathBuf {
        let path = self.dir.join("secret");
        fs::write(&path, format!("{password}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        path
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&format!(
            "{PG_BIN}/pg_ctl -D {}/data -m immediate -w stop >/dev/null 2>&1",
            self.dir.display()
        ))
        .output();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
