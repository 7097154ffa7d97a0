//! `sockets`: on a running system, only approved services listen. Reads
//! the kernel's socket tables (/proc/net/tcp, tcp6, udp, udp6): TCP
//! sockets in LISTEN state and unconnected bound UDP sockets, each judged
//! against an allow list of `tcp/PORT`, `udp/PORT` or `tcp/ADDRESS:PORT`
//! entries; sockets bound to loopback pass when `allow_loopback` says so.
//! A root tree has no sockets: the control applies to live targets only.

use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketsCheck {
    /// `tcp/22`, `udp/68`, `tcp/127.0.0.53:53`.
    pub allow: Vec<String>,
    /// Anything bound to 127.0.0.0/8 or ::1 is allowed.
    #[serde(default)]
    pub allow_loopback: bool,
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub proto: &'static str,
    pub addr: IpAddr,
    pub port: u16,
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            IpAddr::V6(a) => write!(f, "{}/[{a}]:{}", self.proto, self.port),
            IpAddr::V4(a) => write!(f, "{}/{a}:{}", self.proto, self.port),
        }
    }
}

/// The kernel writes addresses as hex of the in-memory words (host byte
/// order per 32-bit word).
fn parse_addr(hex: &str) -> Option<(IpAddr, u16)> {
    let (a, p) = hex.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let words: Vec<u32> = (0..a.len() / 8)
        .map(|i| u32::from_str_radix(&a[i * 8..i * 8 + 8], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    let addr = match words.as_slice() {
        [w] => IpAddr::V4(Ipv4Addr::from(w.to_le_bytes())),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some((addr, port))
}

/// Listening sockets of one /proc/net table. `udp`: bound sockets with
/// no peer (state 07); `tcp`: LISTEN (state 0A).
pub fn listeners(table: &str, proto: &'static str) -> Vec<Listener> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            let state = *c.get(3)?;
            let listening = if proto == "tcp" {
                state == "0A"
            } else {
                state == "07" && c.get(2)?.rsplit_once(':')?.1 == "0000"
            };
            if !listening {
                return None;
            }
            let (addr, port) = parse_addr(c.get(1)?)?;
            Some(Listener { proto, addr, port })
        })
        .collect()
}

impl SocketsCheck {
    pub fn validate(&self) -> Result<(), String> {
        for a in &self.allow {
            let (proto, rest) = a
                .split_once('/')
                .ok_or_else(|| format!("`{a}`: write tcp/PORT or udp/ADDRESS:PORT"))?;
            if proto != "tcp" && proto != "udp" {
                return Err(format!("`{a}`: tcp or udp"));
            }
            let port = rest.rsplit(':').next().unwrap_or(rest);
            port.parse::<u16>()
                .map_err(|_| format!("`{a}`: `{port}` is not a port"))?;
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        format!(
            "only listening: {}{}",
            self.allow.join(", "),
            if self.allow_loopback {
                " and loopback"
            } else {
                ""
            }
        )
    }

    fn allowed(&self, l: &Listener) -> bool {
        if self.allow_loopback && l.addr.is_loopback() {
            return true;
        }
        self.allow.iter().any(|a| {
            let Some((proto, rest)) = a.split_once('/') else {
                return false;
            };
            if proto != l.proto {
                return false;
            }
            match rest.rsplit_once(':') {
                Some((addr, port)) => {
                    port.parse() == Ok(l.port)
                        && addr.trim_matches(['[', ']']).parse::<IpAddr>() == Ok(l.addr)
                }
                None => rest.parse() == Ok(l.port),
            }
        })
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        if !t.is_live() {
            return Outcome::na("listening sockets exist only on a running system");
        }
        let mut all = Vec::new();
        for (file, proto) in [
            ("/proc/net/tcp", "tcp"),
            ("/proc/net/tcp6", "tcp"),
            ("/proc/net/udp", "udp"),
            ("/proc/net/udp6", "udp"),
        ] {
            match t.read_optional(file) {
                Ok(Some(text)) => all.extend(listeners(&text, proto)),
                Ok(None) => {} // IPv6 off: no tcp6/udp6 table
                Err(e) => return Outcome::error(format!("{file}: {e}")),
            }
        }
        let mut f = Findings::new();
        let (ok, bad): (Vec<&Listener>, Vec<&Listener>) = all.iter().partition(|l| self.allowed(l));
        let bad: Vec<String> = bad.iter().map(|l| l.to_string()).collect();
        f.note(format!(
            "listening: {}",
            ok.iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        f.none_of(&bad, "nothing else listens", "not approved");
        f.finish()
    }
}

crate::register_kind!("sockets", SocketsCheck);

#[cfg(test)]
mod tests {
    use super::*;

    // Excerpts of a booted image's tables: sshd on 0.0.0.0:22,
    // systemd-resolved on 127.0.0.53:53, an established SSH connection,
    // the DHCP client on udp 68, and a connected (not listening) UDP
    // socket of timesyncd.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 3500007F:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000   991        0 2 1 0 100 0 0 10 0\n\
   2: 0F02000A:0016 0202000A:C4B2 01 00000000:00000000 02:0009C4C1 00000000     0        0 3 4 0 20 4 30 10 -1\n";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  1: 3500007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   991        0 4 2 0 0\n\
  2: 0F02000A:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000   998        0 5 2 0 0\n\
  3: 0F02000A:D5A1 5F1BA4D8:007B 01 00000000:00000000 00:00000000 00000000   997        0 6 2 0 0\n";

    #[test]
    fn tables_parse_to_listeners() {
        let t = listeners(TCP, "tcp");
        assert_eq!(t.len(), 2, "{t:?}");
        assert_eq!(t[0].to_string(), "tcp/0.0.0.0:22");
        assert_eq!(t[1].to_string(), "tcp/127.0.0.53:53");
        let u = listeners(UDP, "udp");
        assert_eq!(u.len(), 2, "{u:?}");
        assert_eq!(u[1].to_string(), "udp/10.0.2.15:68");
        let v6 = listeners(
            "sl local\n 0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A\n",
            "tcp",
        );
        assert_eq!(v6[0].to_string(), "tcp/[::1]:22");
        let c = SocketsCheck {
            allow: vec!["tcp/22".into(), "udp/68".into()],
            allow_loopback: true,
        };
        c.validate().unwrap();
        assert!(t.iter().chain(&u).all(|l| c.allowed(l)));
        let strict = SocketsCheck {
            allow: vec!["tcp/22".into(), "udp/68".into(), "tcp/127.0.0.53:53".into()],
            allow_loopback: false,
        };
        let bad: Vec<String> = t
            .iter()
            .chain(&u)
            .filter(|l| !strict.allowed(l))
            .map(|l| l.to_string())
            .collect();
        assert_eq!(bad, ["udp/127.0.0.53:53"]);
        assert!(
            SocketsCheck {
                allow: vec!["sctp/1".into()],
                allow_loopback: false
            }
            .validate()
            .is_err()
        );
    }
}
