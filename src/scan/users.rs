//! Users and groups of a target, from its own /etc/passwd and /etc/group
//! (never the scanning host's).

use super::target::Target;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
    pub shell: String,
    pub line: usize,
}

#[derive(Debug, Default)]
pub struct Users {
    pub users: Vec<PasswdEntry>,
    pub groups: BTreeMap<String, (u32, Vec<String>)>,
    /// Group names /etc/group lists more than once.
    pub duplicate_groups: Vec<String>,
    /// Subordinate id ranges (/etc/subuid, /etc/subgid) of existing
    /// users: (first, count). Files inside a user namespace (a
    /// remapped container's layers) are owned by ids from these.
    pub sub_uids: Vec<(u32, u32)>,
    pub sub_gids: Vec<(u32, u32)>,
}

impl Users {
    /// The target's users and groups, parsed once per scan.
    pub fn load(t: &Target) -> std::sync::Arc<Result<Users, String>> {
        t.fact("users", || {
            let read = |p: &str| {
                t.read_optional(p)
                    .map(Option::unwrap_or_default)
                    .map_err(|e| format!("{p}: {e}"))
            };
            let mut u = Users::parse(&read("/etc/passwd")?, &read("/etc/group")?);
            u.sub_uids = u.subordinate(&read("/etc/subuid")?);
            u.sub_gids = u.subordinate(&read("/etc/subgid")?);
            Ok(u)
        })
    }

    pub fn parse(passwd: &str, group: &str) -> Users {
        let users = passwd
            .lines()
            .enumerate()
            .filter_map(|(i, l)| {
                let f: Vec<&str> = l.split(':').collect();
                if f.len() < 7 || l.starts_with('#') {
                    return None;
                }
                Some(PasswdEntry {
                    name: f[0].to_string(),
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                    home: f[5].to_string(),
                    shell: f[6].to_string(),
                    line: i + 1,
                })
            })
            .collect();
        let mut groups = BTreeMap::new();
        let mut duplicate_groups = Vec::new();
        for l in group.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                continue;
            }
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            let Ok(gid) = f[2].parse() else { continue };
            // The first entry of a name is the group, as glibc's files
            // database reads it: a later duplicate neither hides its
            // members nor changes its gid.
            match groups.entry(f[0].to_string()) {
                std::collections::btree_map::Entry::Occupied(_) => {
                    duplicate_groups.push(f[0].to_string());
                }
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert((gid, members));
                }
            }
        }
        Users {
            users,
            groups,
            duplicate_groups,
            sub_uids: Vec::new(),
            sub_gids: Vec::new(),
        }
    }

    /// `NAME:FIRST:COUNT` lines whose NAME is a user of this system.
    pub fn subordinate(&self, text: &str) -> Vec<(u32, u32)> {
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.trim().split(':').collect();
                let [name, first, count] = f.as_slice() else {
                    return None;
                };
                self.users
                    .iter()
                    .any(|u| u.name == *name || u.uid.to_string() == *name)
                    .then_some((first.parse().ok()?, count.parse().ok()?))
            })
            .collect()
    }

    pub fn uid_of(&self, name: &str) -> Option<u32> {
        name.parse()
            .ok()
            .or_else(|| self.users.iter().find(|u| u.name == name).map(|u| u.uid))
    }

    pub fn gid_of(&self, name: &str) -> Option<u32> {
        name.parse()
            .ok()
            .or_else(|| self.groups.get(name).map(|g| g.0))
    }

    pub fn user_name(&self, uid: u32) -> String {
        self.users
            .iter()
            .find(|u| u.uid == uid)
            .map(|u| u.name.clone())
            .unwrap_or_else(|| uid.to_string())
    }

    pub fn group_name(&self, gid: u32) -> String {
        self.groups
            .iter()
            .find(|(_, g)| g.0 == gid)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| gid.to_string())
    }

    /// A user of the system, or an id of a user's subordinate range.
    pub fn has_uid(&self, uid: u32) -> bool {
        self.users.iter().any(|u| u.uid == uid) || in_ranges(&self.sub_uids, uid)
    }

    pub fn has_gid(&self, gid: u32) -> bool {
        self.groups.values().any(|g| g.0 == gid) || in_ranges(&self.sub_gids, gid)
    }
}

fn in_ranges(ranges: &[(u32, u32)], id: u32) -> bool {
    ranges
        .iter()
        .any(|(first, count)| id >= *first && (id as u64) < *first as u64 + *count as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_real_debian_lines() {
        let u = Users::parse(
            "root:x:0:0:root:/root:/bin/bash\nsshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n",
            "root:x:0:\nshadow:x:42:\nsudo:x:27:vcap,ops\n",
        );
        assert_eq!(u.uid_of("sshd"), Some(100));
        assert_eq!(u.uid_of("7"), Some(7));
        assert_eq!(u.gid_of("shadow"), Some(42));
        assert_eq!(u.groups["sudo"].1, vec!["vcap", "ops"]);
        assert_eq!(u.user_name(0), "root");
        assert_eq!(u.group_name(4242), "4242");
        assert_eq!(u.users[1].line, 2);
    }

    #[test]
    fn subordinate_ranges_of_existing_users_own_ids() {
        let mut u = Users::parse(
            "dockremap:x:999:999::/nonexistent:/usr/sbin/nologin\n",
            "dockremap:x:999:\n",
        );
        u.sub_gids = u.subordinate("dockremap:100000:65536\nghost:300000:10\n");
        assert!(u.has_gid(100000) && u.has_gid(165535));
        assert!(!u.has_gid(165536) && !u.has_gid(300000));
        assert!(!u.has_uid(100000));
    }
}
