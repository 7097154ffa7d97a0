//! The postgres role's live proof, in the booted image: a role with a
//! password logs in over TCP with SCRAM and TLS; the same login without
//! a password, and one without TLS, are refused; a `CREATE TABLE` shows
//! in the server log as a pgaudit DDL record; and the server listens
//! only on the addresses its `listen_addresses` names.

use super::Proof;
use std::time::{Duration, Instant};

const ROLE: &str = "stemforge_probe";
const TABLE: &str = "stemforge_probe_audit";

/// psql as the postgres superuser over the local socket (peer); columns
/// joined by `|`.
fn as_postgres(sql: &str) -> Result<String, String> {
    let live = crate::scan::target::Target::live();
    crate::scan::kinds::pg::psql(&live, sql).map(|s| s.trim().replace('\t', "|"))
}

/// psql over TCP as the probe role; `password` in PGPASSWORD if given.
fn over_tcp(sslmode: &str, password: Option<&str>, sql: &str) -> Result<String, String> {
    let conn =
        format!("host=127.0.0.1 dbname=postgres user={ROLE} sslmode={sslmode} connect_timeout=10");
    let mut c = crate::exec::cmd("psql", ["-XAtw", conn.as_str(), "-c", sql])
        .timeout(Duration::from_secs(60))
        .env("PGPASSFILE", "/nonexistent/stemforge-no-pgpass");
    if let Some(p) = password {
        c = c.env("PGPASSWORD", p);
    }
    match c.run_unchecked() {
        Ok(o) if o.status.success() => Ok(o.stdout_str().trim().to_string()),
        Ok(o) => Err(o.stderr_str().trim().to_string()),
        Err(e) => Err(format!("{e:#}")),
    }
}

fn random_password() -> String {
    let mut b = [0u8; 18];
    use std::io::Read;
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    hex::encode(b)
}

/// The TCP addresses listening on `port` (from /proc/net/tcp and tcp6).
fn listeners(port: u16) -> Vec<String> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).unwrap_or_default();
            crate::scan::kinds::sockets::listeners(&text, "tcp")
        })
        .filter(|l| l.port == port)
        .map(|l| l.addr.to_string())
        .collect()
}

/// Whether a listening address is one `listen_addresses` allows.
fn allowed(addr: &str, listen: &str) -> bool {
    listen.split(',').map(str::trim).any(|a| match a {
        "*" => true,
        "0.0.0.0" => !addr.contains(':'),
        "::" => addr.contains(':'),
        "localhost" => addr == "127.0.0.1" || addr == "::1",
        other => other == addr,
    })
}

pub fn prove() -> Vec<Proof> {
    let mut login = Proof::new(
        "postgres",
        "SCRAM over TLS logs in; no password or no TLS is refused",
    );
    let mut audit = Proof::new(
        "postgres",
        "a CREATE TABLE is a pgaudit DDL record in the server log",
    );
    let mut listen = Proof::new(
        "postgres",
        "the server listens only where listen_addresses says",
    );
    let password = random_password();
    let setup = as_postgres(&format!(
        "DROP ROLE IF EXISTS {ROLE}; CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'"
    ));
    if login.step(
        setup.is_ok(),
        format!(
            "created role {ROLE}: {}",
            setup.as_ref().err().map(String::as_str).unwrap_or("ok")
        ),
    ) {
        let verifier = as_postgres(&format!(
            "SELECT left(rolpassword, 14) FROM pg_authid WHERE rolname = '{ROLE}'"
        ));
        login.step(
            verifier.as_deref() == Ok("SCRAM-SHA-256$"),
            format!("its password is stored as {verifier:?}"),
        );
        let ok = over_tcp(
            "require",
            Some(&password),
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        );
        login.step(
            ok.as_deref().is_ok_and(|s| s.starts_with("t|TLS")),
            format!("password login over TCP with TLS: {ok:?}"),
        );
        let nopass = over_tcp("require", None, "SELECT 1");
        login.step(
            nopass.as_ref().is_err_and(|e| e.contains("password")),
            format!("login without a password refused: {nopass:?}"),
        );
        let plain = over_tcp("disable", Some(&password), "SELECT 1");
        login.step(
            plain
                .as_ref()
                .is_err_and(|e| e.contains("no pg_hba.conf entry") || e.contains("no encryption")),
            format!("login without TLS refused: {plain:?}"),
        );
    }
    // DDL audit: the newest log file shows the statement.
    let ddl = as_postgres(&format!(
        "DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (i int)"
    ));
    if audit.step(ddl.is_ok(), format!("CREATE TABLE {TABLE}: {ddl:?}")) {
        let dir = as_postgres(
            "SELECT current_setting('data_directory') || '/' || current_setting('log_directory')",
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut found = None;
        while let Ok(d) = &dir {
            let hit = std::fs::read_dir(d)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    std::fs::read_to_string(e.path())
                        .ok()
                        .map(|t| (e.path(), t))
                })
                .find_map(|(p, t)| {
                    t.lines()
                        .find(|l| {
                            l.contains("AUDIT: SESSION")
                                && l.contains(",DDL,CREATE TABLE")
                                && l.contains(TABLE)
                        })
                        .map(|l| format!("{}: {}", p.display(), l.trim()))
                });
            if hit.is_some() || Instant::now() > deadline {
                found = hit;
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        audit.step(
            found.is_some(),
            found.unwrap_or_else(|| format!("no AUDIT DDL line in {dir:?}")),
        );
        let _ = as_postgres(&format!("DROP TABLE IF EXISTS {TABLE}"));
    }
    let _ = as_postgres(&format!("DROP ROLE IF EXISTS {ROLE}"));
    match (
        as_postgres("SHOW listen_addresses"),
        as_postgres("SHOW port"),
    ) {
        (Ok(addrs), Ok(port)) => {
            let port: u16 = port.parse().unwrap_or(5432);
            let l = listeners(port);
            listen.step(
                !l.is_empty(),
                format!("listening on port {port}: [{}]", l.join(", ")),
            );
            for a in &l {
                listen.step(
                    allowed(a, &addrs),
                    format!("{a}:{port} is allowed by listen_addresses = '{addrs}'"),
                );
            }
        }
        (a, p) => {
            listen.step(false, format!("SHOW listen_addresses/port: {a:?} {p:?}"));
        }
    }
    vec![login, audit, listen]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_decide_which_sockets_may_listen() {
        assert!(allowed("127.0.0.1", "localhost"));
        assert!(allowed("::1", "localhost"));
        assert!(!allowed("10.0.0.5", "localhost"));
        assert!(allowed("10.0.0.5", "localhost, 10.0.0.5"));
        assert!(allowed("10.0.0.5", "*"));
        assert!(!allowed("::", "0.0.0.0"));
    }
}
