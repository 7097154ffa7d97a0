//! `firewall`: an nftables ruleset that denies by default and keeps what
//! must stay reachable. Offline: the ruleset the nftables service loads
//! at boot (/etc/nftables.conf); live: the kernel's ruleset (`nft list
//! ruleset`), which is what actually filters. Each `hook` chain is judged
//! by its policy and its rules: default drop on input (and forward), the
//! loopback interface accepted and its addresses refused elsewhere,
//! established connections accepted, and the TCP ports that must stay
//! open (SSH) accepted.

use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;

pub const NFTABLES_CONF: &str = "/etc/nftables.conf";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirewallCheck {
    /// Hooks whose base chains must drop by default (`input`, `forward`).
    #[serde(default)]
    pub default_drop: Vec<String>,
    /// The input chain accepts the loopback interface and drops
    /// 127.0.0.0/8 arriving anywhere else.
    #[serde(default)]
    pub loopback: bool,
    /// The input chain accepts established and related traffic.
    #[serde(default)]
    pub established: bool,
    /// TCP ports the input chain accepts.
    #[serde(default)]
    pub tcp_open: Vec<u16>,
}

/// A base chain: the hook it is attached to, its policy, its rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    pub table: String,
    pub name: String,
    pub hook: Option<String>,
    pub policy: Option<String>,
    pub rules: Vec<String>,
}

/// The chains of an nftables ruleset, in `nft -f` or `nft list ruleset`
/// syntax. Hand-written: no crate parses nft syntax, and a chain's hook,
/// policy and rule lines are all these checks need (comments dropped,
/// one statement per line or `;`-separated).
pub fn chains(ruleset: &str) -> Vec<Chain> {
    let mut out = Vec::new();
    let mut table = String::new();
    let mut current: Option<Chain> = None;
    let mut depth = 0usize;
    for raw in ruleset.lines() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"table") && line.ends_with('{') {
            table = words[1..words.len() - 1].join(" ");
            depth = 1;
            continue;
        }
        if words.first() == Some(&"chain") && line.ends_with('{') && depth == 1 {
            current = Some(Chain {
                table: table.clone(),
                name: words.get(1).unwrap_or(&"").to_string(),
                hook: None,
                policy: None,
                rules: Vec::new(),
            });
            depth = 2;
            continue;
        }
        if line == "}" {
            if depth == 2 {
                out.extend(current.take());
            }
            depth = depth.saturating_sub(1);
            continue;
        }
        if let Some(c) = current.as_mut() {
            for stmt in line.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                let w: Vec<&str> = stmt.split_whitespace().collect();
                if w.first() == Some(&"type") {
                    if let Some(i) = w.iter().position(|x| *x == "hook") {
                        c.hook = w.get(i + 1).map(|s| s.to_string());
                    }
                } else if w.first() == Some(&"policy") {
                    c.policy = w.get(1).map(|s| s.to_string());
                } else {
                    c.rules.push(stmt.to_string());
                }
            }
        }
    }
    out
}

fn tcp_port_accepted(rule: &str, port: u16) -> bool {
    let Some(rest) = rule.split("tcp dport").nth(1) else {
        return false;
    };
    if !rule.trim_end().ends_with("accept") {
        return false;
    }
    let spec = rest.trim_start();
    let spec = if spec.starts_with('{') {
        spec[1..spec.find('}').unwrap_or(spec.len())].to_string()
    } else {
        spec.split_whitespace().next().unwrap_or("").to_string()
    };
    spec.split(',').map(str::trim).any(|p| {
        p == port.to_string()
            || (port == 22 && p == "ssh")
            || p.split_once('-').is_some_and(|(a, b)| {
                a.parse::<u16>().is_ok_and(|a| a <= port)
                    && b.parse::<u16>().is_ok_and(|b| port <= b)
            })
    })
}

impl FirewallCheck {
    pub fn validate(&self) -> Result<(), String> {
        for h in &self.default_drop {
            if !["input", "forward", "output"].contains(&h.as_str()) {
                return Err(format!("hook `{h}`: input, forward or output"));
            }
        }
        if self.default_drop.is_empty()
            && !self.loopback
            && !self.established
            && self.tcp_open.is_empty()
        {
            return Err("say what to check".into());
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        let mut p = Vec::new();
        if !self.default_drop.is_empty() {
            p.push(format!("default drop on {}", self.default_drop.join(", ")));
        }
        if self.loopback {
            p.push("loopback accepted, 127.0.0.0/8 elsewhere dropped".into());
        }
        if self.established {
            p.push("established traffic accepted".into());
        }
        if !self.tcp_open.is_empty() {
            let ports: Vec<String> = self.tcp_open.iter().map(|p| p.to_string()).collect();
            p.push(format!("tcp {} accepted", ports.join(", ")));
        }
        format!("nftables: {}", p.join("; "))
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        let (source, text) = if t.is_live() {
            match t.stdout("nft", &["list", "ruleset"]) {
                Ok(text) => ("nft list ruleset".to_string(), text),
                Err(e) => return Outcome::error(e),
            }
        } else {
            match t.read_optional(NFTABLES_CONF) {
                Ok(Some(s)) => (NFTABLES_CONF.to_string(), s),
                Ok(None) => return Outcome::fail(format!("{NFTABLES_CONF} does not exist")),
                Err(e) => return Outcome::error(format!("{NFTABLES_CONF}: {e}")),
            }
        };
        let all = chains(&text);
        let mut f = Findings::new();
        // A packet passes every base chain of its hook in turn, and a
        // drop in any one of them is final: the hook denies by default
        // when at least one of its base chains has policy drop (other
        // tables, such as Docker's iptables-nft ones, may accept).
        for hook in &self.default_drop {
            let base: Vec<&Chain> = all
                .iter()
                .filter(|c| c.hook.as_deref() == Some(hook))
                .collect();
            let describe = |c: &Chain| {
                format!(
                    "{source}: {} {} ({hook}) policy {}",
                    c.table,
                    c.name,
                    c.policy.as_deref().unwrap_or("accept (default)")
                )
            };
            match base.iter().find(|c| c.policy.as_deref() == Some("drop")) {
                Some(c) => {
                    f.ok(describe(c));
                    for other in base.iter().filter(|o| !std::ptr::eq(**o, *c)) {
                        f.note(describe(other));
                    }
                }
                None if base.is_empty() => f.bad(format!("{source}: no chain on the {hook} hook")),
                None => {
                    for c in &base {
                        f.bad(describe(c));
                    }
                }
            }
        }
        let input: Vec<&String> = all
            .iter()
            .filter(|c| c.hook.as_deref() == Some("input"))
            .flat_map(|c| &c.rules)
            .collect();
        let has = |pred: &dyn Fn(&str) -> bool, what: &str, f: &mut Findings| match input
            .iter()
            .find(|r| pred(r))
        {
            Some(r) => f.ok(format!("{source}: {what}: {r}")),
            None => f.bad(format!("{source}: no input rule: {what}")),
        };
        if self.loopback {
            has(
                &|r| r.contains("iif") && r.contains("lo") && r.ends_with("accept"),
                "loopback accepted",
                &mut f,
            );
            has(
                &|r| r.contains("127.0.0.0/8") && r.ends_with("drop"),
                "127.0.0.0/8 on other interfaces dropped",
                &mut f,
            );
        }
        if self.established {
            has(
                &|r| r.contains("ct state") && r.contains("established") && r.ends_with("accept"),
                "established accepted",
                &mut f,
            );
        }
        for port in &self.tcp_open {
            has(
                &|r| tcp_port_accepted(r, *port),
                &format!("tcp {port} accepted"),
                &mut f,
            );
        }
        f.finish()
    }
}

crate::register_kind!("firewall", FirewallCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::outcome::Status;

    /// What `nft list ruleset` prints for the image's ruleset.
    const LISTED: &str = "table inet filter {\n\tchain input {\n\t\ttype filter hook input priority filter; policy drop;\n\t\tiif \"lo\" accept\n\t\tip saddr 127.0.0.0/8 drop\n\t\tct state established,related accept\n\t\tct state invalid drop\n\t\tmeta l4proto { icmp, ipv6-icmp } accept\n\t\ttcp dport { 22, 6868 } accept\n\t}\n\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy drop;\n\t}\n\n\tchain output {\n\t\ttype filter hook output priority filter; policy accept;\n\t}\n}\n";

    #[test]
    fn rulesets_parse_and_are_judged() {
        let c = chains(LISTED);
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].hook.as_deref(), Some("input"));
        assert_eq!(c[0].policy.as_deref(), Some("drop"));
        assert_eq!(c[0].rules.len(), 6, "{:?}", c[0].rules);
        assert!(tcp_port_accepted("tcp dport { 22, 6868 } accept", 22));
        assert!(tcp_port_accepted("tcp dport 1-1024 accept", 22));
        assert!(tcp_port_accepted("tcp dport ssh accept", 22));
        assert!(!tcp_port_accepted("tcp dport 2222 accept", 22));
        assert!(!tcp_port_accepted("tcp dport 22 drop", 22));

        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        let check = FirewallCheck {
            default_drop: vec!["input".into(), "forward".into()],
            loopback: true,
            established: true,
            tcp_open: vec![22],
        };
        check.validate().unwrap();
        let eval = |text: &str| {
            std::fs::write(d.path().join("etc/nftables.conf"), text).unwrap();
            check.eval(&Target::root(d.path()).unwrap())
        };
        assert_eq!(eval(LISTED).status, Status::Pass, "{:?}", eval(LISTED));
        // An open input policy, SSH forgotten, no ruleset at all.
        let open = eval(&LISTED.replacen("policy drop", "policy accept", 1));
        assert_eq!(open.status, Status::Fail);
        assert!(
            open.evidence.join("\n").contains("input) policy accept"),
            "{open:?}"
        );
        let no_ssh = eval(&LISTED.replace("{ 22, 6868 }", "6868"));
        assert!(
            no_ssh.evidence.join("\n").contains("no input rule: tcp 22"),
            "{no_ssh:?}"
        );
        assert_eq!(eval("flush ruleset\n").status, Status::Fail);
        // Docker's own table accepts on the forward hook; ours still drops,
        // and a drop in any base chain is final.
        let docker = format!(
            "{LISTED}\ntable ip filter {{\n\tchain FORWARD {{\n\t\ttype filter hook forward priority filter; policy accept;\n\t}}\n}}\n"
        );
        assert_eq!(eval(&docker).status, Status::Pass, "{:?}", eval(&docker));
        let both_open = docker.replace(
            "hook forward priority filter; policy drop;",
            "hook forward priority filter; policy accept;",
        );
        assert_eq!(eval(&both_open).status, Status::Fail);
    }
}
