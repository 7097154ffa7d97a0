//! `pg_hba`: PostgreSQL's client authentication rules. Every line of
//! each cluster's pg_hba.conf (the `hba_file` setting, offline from the
//! configuration, live from `SHOW hba_file`) must use an allowed method;
//! optionally, network lines must be `hostssl`, and a named user must
//! log in locally by `peer`.

use crate::scan::kinds::pg;
use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgHbaCheck {
    /// The only authentication methods a line may use.
    #[serde(default)]
    pub methods: Vec<String>,
    /// No plain `host` line (TCP without TLS may not authenticate).
    #[serde(default)]
    pub ssl_only: bool,
    /// This user has a `local` line with method `peer`.
    #[serde(default)]
    pub local_peer_for: Option<String>,
}

/// One rule: (line, type, database, user, method).
pub fn parse_hba(text: &str) -> Vec<(usize, String, String, String, String)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, raw)| {
            let l = raw.split('#').next().unwrap_or("").trim();
            if l.is_empty() {
                return None;
            }
            let f: Vec<&str> = l.split_whitespace().collect();
            let kind = f[0].to_string();
            // local: type db user method; host*: type db user address [mask] method.
            let method_at = if kind == "local" {
                3
            } else if f
                .get(3)
                .is_some_and(|a| a.contains('/') || !a.contains('.') && !a.contains(':'))
            {
                4
            } else {
                5
            };
            // Options (key=value) follow the method.
            let method = f
                .iter()
                .skip(method_at.min(f.len()))
                .find(|w| !w.contains('='))
                .or_else(|| f.last())
                .map(|s| s.to_string())
                .unwrap_or_default();
            Some((
                i + 1,
                kind,
                f.get(1).unwrap_or(&"").to_string(),
                f.get(2).unwrap_or(&"").to_string(),
                method,
            ))
        })
        .collect()
}

impl PgHbaCheck {
    pub fn validate(&self) -> Result<(), String> {
        if self.methods.is_empty() && !self.ssl_only && self.local_peer_for.is_none() {
            return Err("give `methods`, `ssl_only` or `local_peer_for`".into());
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let mut p = Vec::new();
        if !self.methods.is_empty() {
            p.push(format!("methods only {}", self.methods.join(", ")));
        }
        if self.ssl_only {
            p.push("network lines are hostssl".into());
        }
        if let Some(u) = &self.local_peer_for {
            p.push(format!("{u} logs in locally by peer"));
        }
        format!("pg_hba.conf: {}", p.join("; "))
    }

    fn hba_files(t: &Target) -> Result<Vec<String>, String> {
        if t.is_live() {
            let out = t.stdout(
                "runuser",
                &[
                    "-u",
                    "postgres",
                    "--",
                    "psql",
                    "-XAt",
                    "-c",
                    "SHOW hba_file",
                ],
            )?;
            return Ok(vec![out.trim().to_string()]);
        }
        let clusters = t.fact("pg.clusters", || pg::clusters(t)).as_ref().clone()?;
        Ok(clusters
            .iter()
            .map(|(conf, s)| match s.get("hba_file") {
                Some((v, _)) => v.clone(),
                None => format!(
                    "{}/pg_hba.conf",
                    conf.rsplit_once('/').map(|x| x.0).unwrap_or("")
                ),
            })
            .collect())
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let files = match Self::hba_files(t) {
            Ok(f) if f.is_empty() => {
                return Outcome::fail("no PostgreSQL cluster under /etc/postgresql");
            }
            Ok(f) => f,
            Err(e) => return Outcome::error(e),
        };
        let mut f = Findings::new();
        for file in files {
            let text = match t.read_to_string(&file) {
                Ok(s) => s,
                Err(e) => return Outcome::error(format!("{file}: {e}")),
            };
            let rules = parse_hba(&text);
            if !self.methods.is_empty() {
                let bad: Vec<String> = rules
                    .iter()
                    .filter(|r| !self.methods.iter().any(|m| m == &r.4))
                    .map(|r| format!("{file}:{}: {} {} {} {}", r.0, r.1, r.2, r.3, r.4))
                    .collect();
                f.none_of(
                    &bad,
                    format!("{file}: every line uses {}", self.methods.join(" or ")),
                    &file,
                );
            }
            if self.ssl_only {
                let plain: Vec<String> = rules
                    .iter()
                    .filter(|r| r.1 == "host" || r.1 == "hostnossl")
                    .map(|r| format!("{file}:{}: {} line", r.0, r.1))
                    .collect();
                f.none_of(&plain, format!("{file}: network lines are hostssl"), &file);
            }
            if let Some(u) = &self.local_peer_for {
                match rules
                    .iter()
                    .find(|r| r.1 == "local" && (&r.3 == u || r.3 == "all"))
                {
                    Some(r) => f.check(
                        r.4 == "peer",
                        format!("{file}:{}: local {} {} {}", r.0, r.2, r.3, r.4),
                    ),
                    None => f.bad(format!("{file}: no local line for {u}")),
                }
            }
        }
        f.finish()
    }
}

crate::register_kind!("pg_hba", PgHbaCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::check::parse_check;
    use crate::scan::outcome::Status;
    use std::fs;

    #[test]
    fn methods_and_lines_of_pg_hba() {
        let r = parse_hba(
            "local all postgres peer\nhostssl all all 0.0.0.0/0 scram-sha-256\nhost all all 10.0.0.1 255.0.0.0 md5\nhostssl all all ::1/128 cert clientcert=verify-full\n",
        );
        assert_eq!(r[0].4, "peer");
        assert_eq!(r[1].4, "scram-sha-256");
        assert_eq!(r[2].4, "md5");
        assert_eq!(r[3].4, "cert");
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("etc/postgresql/15/main");
        fs::create_dir_all(&c).unwrap();
        fs::write(
            c.join("postgresql.conf"),
            "hba_file = '/etc/postgresql/15/main/pg_hba.conf'\n",
        )
        .unwrap();
        fs::write(c.join("pg_hba.conf"), "local all postgres peer\nlocal all all scram-sha-256\nhostssl all all 127.0.0.1/32 scram-sha-256\n").unwrap();
        let check = parse_check(
            "pg_hba: { methods: [scram-sha-256, peer], ssl_only: true, local_peer_for: postgres }",
        )
        .unwrap();
        let eval = || check.eval(&Target::root(d.path()).unwrap());
        assert_eq!(eval().status, Status::Pass, "{:?}", eval());
        fs::write(
            c.join("pg_hba.conf"),
            "local all postgres peer\nhost all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        let o = eval();
        assert_eq!(o.status, Status::Fail);
        assert!(
            o.evidence.iter().any(|e| e.contains("pg_hba.conf:2")),
            "{o:?}"
        );
    }
}
