//! `sshd`: effective sshd settings. Offline: sshd_config with its Include
//! drop-ins expanded in place, first value wins, global section only (as
//! sshd reads it); unset keywords take OpenSSH's defaults. Live: `sshd -T`.

use crate::scan::expect::{Expect, deserialize_expect_map};
use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;
use std::collections::BTreeMap;

const MAIN: &str = "/etc/ssh/sshd_config";

#[derive(Debug, Clone, Deserialize)]
#[serde(transparent)]
pub struct SshdCheck {
    #[serde(deserialize_with = "deserialize_expect_map")]
    pub settings: Vec<(String, Expect)>,
}

/// OpenSSH's compiled-in defaults for the keywords controls look at
/// (OpenSSH 8.9–9.6, as `sshd -T` prints them).
fn default_of(keyword: &str) -> Option<&'static str> {
    Some(match keyword {
        "permitrootlogin" => "prohibit-password",
        "x11forwarding" => "no",
        "maxauthtries" => "6",
        "loglevel" => "INFO",
        "ignorerhosts" => "yes",
        "hostbasedauthentication" => "no",
        "permitemptypasswords" => "no",
        "permituserenvironment" => "no",
        "clientaliveinterval" => "0",
        "clientalivecountmax" => "3",
        "protocol" => "2",
        "banner" => "none",
        "usepam" => "no",
        "passwordauthentication" => "yes",
        "pubkeyauthentication" => "yes",
        "kbdinteractiveauthentication" => "yes",
        "logingracetime" => "120",
        "maxsessions" => "10",
        "maxstartups" => "10:30:100",
        "allowtcpforwarding" => "yes",
        "allowagentforwarding" => "yes",
        "gatewayports" => "no",
        "permittunnel" => "no",
        "strictmodes" => "yes",
        "compression" => "yes",
        "ciphers" => {
            "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com"
        }
        "macs" => {
            "umac-64-etm@openssh.com,umac-128-etm@openssh.com,hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com,hmac-sha1-etm@openssh.com,umac-64@openssh.com,umac-128@openssh.com,hmac-sha2-256,hmac-sha2-512,hmac-sha1"
        }
        _ => return None,
    })
}

/// An effective setting and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SshdValue {
    pub value: String,
    pub origin: String,
}

/// Parse the offline configuration into keyword → first value.
pub fn offline_config(t: &Target) -> Result<BTreeMap<String, SshdValue>, String> {
    let mut out = BTreeMap::new();
    let mut in_match = false;
    read_file(t, MAIN, &mut out, &mut in_match, 0)?;
    Ok(out)
}

fn read_file(
    t: &Target,
    path: &str,
    out: &mut BTreeMap<String, SshdValue>,
    in_match: &mut bool,
    depth: usize,
) -> Result<(), String> {
    if depth > 16 {
        return Err(format!("{path}: Include nested too deeply"));
    }
    let text = t.read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    for (i, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let (kw, rest) = split_keyword(l);
        let kw = kw.to_ascii_lowercase();
        if kw == "match" {
            *in_match = true;
            continue;
        }
        if kw == "include" {
            for pattern in rest.split_whitespace() {
                let pattern = if pattern.starts_with('/') {
                    pattern.to_string()
                } else {
                    format!("/etc/ssh/{pattern}")
                };
                let files = t.glob(&pattern).map_err(|e| format!("{pattern}: {e}"))?;
                for f in files {
                    read_file(t, &f, out, in_match, depth + 1)?;
                }
            }
            continue;
        }
        if *in_match {
            continue;
        }
        out.entry(kw).or_insert_with(|| SshdValue {
            value: rest.to_string(),
            origin: format!("{path}:{}", i + 1),
        });
    }
    Ok(())
}

fn split_keyword(l: &str) -> (&str, &str) {
    let cut = l
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(l.len());
    let rest = l[cut..].trim_start();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim();
    (&l[..cut], rest.trim_matches('"'))
}

/// Parse `sshd -T` output into keyword → value.
pub fn parse_sshd_t(out: &str) -> BTreeMap<String, SshdValue> {
    let mut m = BTreeMap::new();
    for l in out.lines() {
        let (k, v) = split_keyword(l.trim());
        if k.is_empty() {
            continue;
        }
        m.entry(k.to_ascii_lowercase())
            .or_insert_with(|| SshdValue {
                value: v.to_string(),
                origin: "sshd -T".to_string(),
            });
    }
    m
}

impl SshdCheck {
    pub fn validate(&self) -> Result<(), String> {
        if self.settings.is_empty() {
            return Err("name at least one sshd keyword".into());
        }
        for (k, e) in &self.settings {
            if !k.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(format!("`{k}` is not an sshd keyword"));
            }
            e.validate().map_err(|m| format!("{k}: {m}"))?;
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        self.settings
            .iter()
            .map(|(k, e)| format!("sshd {k} {}", e.describe()))
            .collect::<Vec<_>>()
            .join("; ")
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let loaded = t.fact("sshd config", || effective_config(t));
        let config = match loaded.as_ref() {
            Ok(c) => c,
            Err(o) => return o.clone(),
        };
        let mut f = Findings::new();
        for (kw, want) in &self.settings {
            let key = kw.to_ascii_lowercase();
            let (value, origin) = match config.get(&key) {
                Some(v) => (Some(v.value.clone()), v.origin.clone()),
                None => (
                    default_of(&key).map(str::to_string),
                    "OpenSSH default".to_string(),
                ),
            };
            match want.test(value.as_deref()) {
                Ok(()) => f.ok(format!("{origin}: {kw} {}", value.unwrap_or_default())),
                Err(why) => f.bad(format!("{origin}: {kw} {why}")),
            }
        }
        f.finish()
    }
}

/// The server's effective settings: `sshd -T` live, the configuration
/// files offline; or the outcome every sshd check has without them.
fn effective_config(t: &Target) -> Result<BTreeMap<String, SshdValue>, Outcome> {
    if t.is_live() {
        let Some(sshd) = t.find_program("sshd") else {
            return Err(Outcome::na(
                "no sshd on this system: OpenSSH server not installed",
            ));
        };
        t.stdout(&sshd.to_string_lossy(), &["-T"])
            .map(|text| parse_sshd_t(&text))
            .map_err(Outcome::error)
    } else {
        match t.read_optional(MAIN) {
            Ok(None) => return Err(Outcome::na(format!("{MAIN}: OpenSSH server not installed"))),
            Err(e) => return Err(Outcome::error(format!("{MAIN}: {e}"))),
            Ok(Some(_)) => {}
        }
        offline_config(t).map_err(Outcome::error)
    }
}

crate::register_kind!("sshd", SshdCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;
    use std::fs;

    /// The head of Debian 12's stock sshd_config.
    const STOCK: &str = "Include /etc/ssh/sshd_config.d/*.conf\n\
        #PermitRootLogin prohibit-password\n\
        KbdInteractiveAuthentication no\n\
        UsePAM yes\n\
        X11Forwarding yes\n\
        PrintMotd no\n\
        AcceptEnv LANG LC_*\n\
        Subsystem\tsftp\t/usr/lib/openssh/sftp-server\n\
        Match User anoncvs\n\
        \tPermitRootLogin yes\n";

    fn tree(dropin: Option<&str>) -> (tempfile::TempDir, Target) {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("etc/ssh/sshd_config.d")).unwrap();
        fs::write(r.join("etc/ssh/sshd_config"), STOCK).unwrap();
        if let Some(text) = dropin {
            fs::write(r.join("etc/ssh/sshd_config.d/00-hardening.conf"), text).unwrap();
        }
        {
            let t = Target::root(r).unwrap();
            (d, t)
        }
    }

    fn check(y: &str) -> SshdCheck {
        let c: SshdCheck = serde_yaml::from_str(y).unwrap();
        c.validate().unwrap();
        c
    }

    #[test]
    fn stock_defaults_and_match_blocks() {
        let (_d, t) = tree(None);
        let o = check("{ PermitRootLogin: \"no\" }").eval(&t);
        assert_eq!(o.status, Status::Fail);
        assert!(o.evidence[0].contains("OpenSSH default"), "{o:?}");
        let o = check("{ X11Forwarding: \"no\" }").eval(&t);
        assert_eq!(o.status, Status::Fail);
        assert!(o.evidence[0].contains("sshd_config:5"), "{o:?}");
        // Protocol 2 is the only protocol modern sshd speaks.
        assert_eq!(check("{ Protocol: \"2\" }").eval(&t).status, Status::Pass);
    }

    #[test]
    fn dropins_win_because_they_come_first() {
        let (_d, t) = tree(Some(
            "X11Forwarding no\nPermitRootLogin no\nCiphers aes256-ctr,aes192-ctr,aes128-ctr\nMaxAuthTries 3\n",
        ));
        let o =
            check("{ X11Forwarding: \"no\", PermitRootLogin: \"no\", MaxAuthTries: { max: 3 } }")
                .eval(&t);
        assert_eq!(o.status, Status::Pass, "{o:?}");
        assert!(o.evidence[0].contains("00-hardening.conf:1"));
        let ciphers = check("{ Ciphers: { subset_of: [aes128-ctr, aes192-ctr, aes256-ctr] } }");
        assert_eq!(ciphers.eval(&t).status, Status::Pass);
        let (_d2, stock) = tree(None);
        assert_eq!(ciphers.eval(&stock).status, Status::Fail);
    }

    #[test]
    fn sshd_t_output_parses() {
        let m = parse_sshd_t("port 22\npermitrootlogin no\nciphers aes128-ctr,aes256-ctr\n");
        assert_eq!(m["permitrootlogin"].value, "no");
        assert_eq!(m["ciphers"].value, "aes128-ctr,aes256-ctr");
    }

    #[test]
    fn missing_server_is_not_applicable() {
        let d = tempfile::tempdir().unwrap();
        let t = Target::root(d.path()).unwrap();
        assert_eq!(
            check("{ PermitRootLogin: \"no\" }").eval(&t).status,
            Status::NotApplicable
        );
    }
}
