//! `kv`: a key's value in a `key = value` or `KEY value` configuration file
//! (auditd.conf, login.defs, pwquality.conf). The last setting wins.

use crate::scan::expect::{Expect, deserialize_expect};
use crate::scan::outcome::Outcome;
use crate::scan::target::Target;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvCheck {
    pub path: String,
    pub key: String,
    #[serde(deserialize_with = "deserialize_expect")]
    pub value: Expect,
}

/// One `key value` line: (1-based line, key, value).
pub fn parse_kv(text: &str) -> Vec<(usize, String, String)> {
    text.lines()
        .enumerate()
        .filter_map(|(i, raw)| {
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                return None;
            }
            let cut = l
                .find(|c: char| c == '=' || c.is_whitespace())
                .unwrap_or(l.len());
            let key = l[..cut].trim().to_string();
            let rest = l[cut..].trim_start();
            let rest = rest.strip_prefix('=').unwrap_or(rest).trim();
            // Trailing comments are not part of values in these files.
            let value = match rest.find(" #") {
                Some(idx) => rest[..idx].trim(),
                None => rest,
            };
            Some((i + 1, key, value.to_string()))
        })
        .collect()
}

impl KvCheck {
    pub fn validate(&self) -> Result<(), String> {
        if !self.path.starts_with('/') {
            return Err(format!("path `{}` must be absolute", self.path));
        }
        self.value.validate()
    }

    pub fn describe(&self) -> String {
        format!("{} {} {}", self.path, self.key, self.value.describe())
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let text = match t.read_optional(&self.path) {
            Ok(Some(text)) => text,
            Ok(None) => {
                return if self.value.wants_absent() {
                    Outcome::pass(format!("{}: absent", self.path))
                } else {
                    Outcome::fail(format!("{}: does not exist", self.path))
                };
            }
            Err(e) => return Outcome::error(format!("{}: {e}", self.path)),
        };
        let found = parse_kv(&text)
            .into_iter()
            .rfind(|(_, k, _)| k.eq_ignore_ascii_case(&self.key));
        let (value, at) = match &found {
            Some((line, _, v)) => (Some(v.as_str()), format!("{}:{line}", self.path)),
            None => (None, self.path.clone()),
        };
        match self.value.test(value) {
            Ok(()) => Outcome::pass(format!(
                "{at}: {} = {}",
                self.key,
                value.unwrap_or("(not set)")
            )),
            Err(why) => Outcome::fail(format!("{at}: {} {why}", self.key)),
        }
    }
}

crate::register_kind!("kv", KvCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;

    #[test]
    fn parses_both_styles() {
        let kv = parse_kv("# c\nmax_log_file = 8\nPASS_MIN_DAYS\t0\nx=1 # note\n");
        assert_eq!(kv[0], (2, "max_log_file".into(), "8".into()));
        assert_eq!(kv[1], (3, "PASS_MIN_DAYS".into(), "0".into()));
        assert_eq!(kv[2], (4, "x".into(), "1".into()));
    }

    #[test]
    fn evaluates_against_a_real_auditd_conf_excerpt() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc/audit")).unwrap();
        // Debian 12's stock values.
        std::fs::write(
            d.path().join("etc/audit/auditd.conf"),
            "log_file = /var/log/audit/audit.log\nmax_log_file = 8\nmax_log_file_action = ROTATE\n",
        )
        .unwrap();
        let t = Target::root(d.path()).unwrap();
        let c: KvCheck =
            serde_yaml::from_str("{ path: /etc/audit/auditd.conf, key: max_log_file, value: 6 }")
                .unwrap();
        let o = c.eval(&t);
        assert_eq!(o.status, Status::Fail);
        assert!(o.evidence[0].contains("auditd.conf:2"), "{o:?}");
        let c: KvCheck = serde_yaml::from_str(
            "{ path: /etc/audit/auditd.conf, key: max_log_file_action, value: keep_logs }",
        )
        .unwrap();
        assert_eq!(c.eval(&t).status, Status::Fail);
        std::fs::write(
            d.path().join("etc/audit/auditd.conf"),
            "max_log_file_action = KEEP_LOGS\n",
        )
        .unwrap();
        assert_eq!(c.eval(&t).status, Status::Pass);
    }
}
