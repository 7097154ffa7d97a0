//! `docker`: the running Docker daemon and its containers, live only.
//! `info` tests key paths of `docker info` (what the daemon actually
//! runs with, whatever its files say); `containers` judges every
//! running container from `docker inspect`: properties it must not have
//! (privileged, host namespaces, the daemon's socket mounted) and limits
//! it must have (read-only root, memory, CPU, PIDs). Offline there is
//! no daemon to ask: not applicable.

use crate::scan::expect::{Expect, deserialize_expect_map};
use crate::scan::keypath;
use crate::scan::outcome::{Findings, Outcome};
use crate::scan::target::Target;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerCheck {
    #[serde(default, deserialize_with = "deserialize_expect_map")]
    pub info: Vec<(String, Expect)>,
    #[serde(default)]
    pub containers: Option<ContainerRules>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerRules {
    /// Properties no running container may have.
    #[serde(default)]
    pub forbid: Vec<Property>,
    /// Properties every running container must have.
    #[serde(default)]
    pub require: Vec<Property>,
}

/// What `docker inspect` shows of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Property {
    Privileged,
    HostNetwork,
    HostPid,
    HostIpc,
    HostUts,
    HostUserns,
    /// The daemon's socket is mounted into it.
    DockerSocket,
    UnconfinedSeccomp,
    UnconfinedApparmor,
    /// Capabilities added beyond the default set.
    AddedCapabilities,
    ReadOnlyRoot,
    MemoryLimit,
    CpuLimit,
    PidsLimit,
    /// A restart policy of on-failure with at most 5 retries, or none.
    BoundedRestart,
    /// Host devices passed in (`--device`).
    HostDevices,
    /// A mount with shared propagation.
    SharedPropagation,
    /// A sensitive host directory mounted (/, /boot, /dev, /etc, /lib,
    /// /proc, /sys, /usr).
    SensitiveMounts,
    /// A published port bound to every host address.
    PortsOnAllInterfaces,
    /// A cgroup parent other than the daemon's.
    CustomCgroupParent,
    /// Its process runs as root (no USER, or USER root/0).
    RootUser,
}

impl Property {
    fn name(self) -> &'static str {
        match self {
            Property::Privileged => "privileged",
            Property::HostNetwork => "host network",
            Property::HostPid => "host PID namespace",
            Property::HostIpc => "host IPC namespace",
            Property::HostUts => "host UTS namespace",
            Property::HostUserns => "host user namespace",
            Property::DockerSocket => "Docker socket mounted",
            Property::UnconfinedSeccomp => "seccomp unconfined",
            Property::UnconfinedApparmor => "AppArmor unconfined",
            Property::AddedCapabilities => "added capabilities",
            Property::ReadOnlyRoot => "read-only root file system",
            Property::MemoryLimit => "memory limit",
            Property::CpuLimit => "CPU limit",
            Property::PidsLimit => "PIDs limit",
            Property::BoundedRestart => "bounded restart policy",
            Property::HostDevices => "host devices",
            Property::SharedPropagation => "shared-propagation mount",
            Property::SensitiveMounts => "sensitive host directory mounted",
            Property::PortsOnAllInterfaces => "port published on every host address",
            Property::CustomCgroupParent => "custom cgroup parent",
            Property::RootUser => "root process user",
        }
    }

    /// Whether the inspected container has it.
    fn of(self, c: &Value) -> bool {
        let hc = |k: &str| keypath::lookup(c, &format!("HostConfig.{k}"));
        let is = |k: &str, v: &str| hc(k).and_then(Value::as_str) == Some(v);
        let positive = |k: &str| hc(k).and_then(Value::as_i64).unwrap_or(0) > 0;
        let mounts: Vec<&Value> = c
            .get("Mounts")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        let sec_opts: Vec<&str> = hc("SecurityOpt")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        match self {
            Property::Privileged => hc("Privileged").and_then(Value::as_bool) == Some(true),
            Property::HostNetwork => is("NetworkMode", "host"),
            Property::HostPid => is("PidMode", "host"),
            Property::HostIpc => is("IpcMode", "host"),
            Property::HostUts => is("UTSMode", "host"),
            Property::HostUserns => is("UsernsMode", "host"),
            Property::DockerSocket => mounts
                .iter()
                .filter_map(|m| m.get("Source").and_then(Value::as_str))
                .any(|s| s.ends_with("/docker.sock")),
            Property::UnconfinedSeccomp => sec_opts
                .iter()
                .any(|o| o.replace(':', "=") == "seccomp=unconfined"),
            Property::UnconfinedApparmor => {
                c.get("AppArmorProfile").and_then(Value::as_str) == Some("unconfined")
                    || sec_opts
                        .iter()
                        .any(|o| o.replace(':', "=") == "apparmor=unconfined")
            }
            Property::AddedCapabilities => hc("CapAdd")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty()),
            Property::ReadOnlyRoot => hc("ReadonlyRootfs").and_then(Value::as_bool) == Some(true),
            Property::MemoryLimit => positive("Memory"),
            Property::CpuLimit => {
                positive("NanoCpus") || positive("CpuQuota") || !is("CpusetCpus", "")
            }
            Property::PidsLimit => positive("PidsLimit"),
            Property::BoundedRestart => {
                let name = hc("RestartPolicy.Name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let max = hc("RestartPolicy.MaximumRetryCount")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                matches!(name, "" | "no") || (name == "on-failure" && max <= 5)
            }
            Property::HostDevices => hc("Devices")
                .and_then(Value::as_array)
                .is_some_and(|a| !a.is_empty()),
            Property::SharedPropagation => mounts.iter().any(|m| {
                matches!(
                    m.get("Propagation").and_then(Value::as_str),
                    Some("shared" | "rshared")
                )
            }),
            Property::SensitiveMounts => mounts
                .iter()
                .filter(|m| m.get("Type").and_then(Value::as_str) == Some("bind"))
                .filter_map(|m| m.get("Source").and_then(Value::as_str))
                .any(|s| {
                    let s = s.trim_end_matches('/');
                    s.is_empty()
                        || ["/boot", "/dev", "/etc", "/lib", "/proc", "/sys", "/usr"]
                            .iter()
                            .any(|d| s == *d || s.starts_with(&format!("{d}/")))
                }),
            Property::PortsOnAllInterfaces => hc("PortBindings")
                .and_then(Value::as_object)
                .into_iter()
                .flat_map(|m| m.values())
                .filter_map(Value::as_array)
                .flatten()
                .any(|b| {
                    matches!(
                        b.get("HostIp").and_then(Value::as_str),
                        None | Some("" | "0.0.0.0" | "::")
                    )
                }),
            Property::CustomCgroupParent => !is("CgroupParent", "") && hc("CgroupParent").is_some(),
            Property::RootUser => matches!(
                keypath::lookup(c, "Config.User")
                    .and_then(Value::as_str)
                    .unwrap_or(""),
                "" | "root" | "0" | "0:0" | "root:root"
            ),
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn container_name(c: &Value) -> String {
    let name = c.get("Name").and_then(Value::as_str).unwrap_or("");
    let id = c.get("Id").and_then(Value::as_str).unwrap_or("");
    format!(
        "{} ({})",
        name.trim_start_matches('/'),
        &id[..id.len().min(12)]
    )
}

impl DockerCheck {
    pub fn validate(&self) -> Result<(), String> {
        match &self.containers {
            None if self.info.is_empty() => {
                Err("test `info` key paths or `containers` properties".into())
            }
            Some(r) if r.forbid.is_empty() && r.require.is_empty() => {
                Err("`containers` needs `forbid` or `require`".into())
            }
            _ if !self.info.is_empty() => keypath::validate_keys(&self.info),
            _ => Ok(()),
        }
    }

    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.info.is_empty() {
            parts.push(format!(
                "docker info: {}",
                keypath::describe_keys(&self.info)
            ));
        }
        if let Some(r) = &self.containers {
            let names = |v: &[Property]| v.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ");
            if !r.forbid.is_empty() {
                parts.push(format!("no running container has {}", names(&r.forbid)));
            }
            if !r.require.is_empty() {
                parts.push(format!("every running container has {}", names(&r.require)));
            }
        }
        parts.join("; ")
    }

    pub fn eval(&self, t: &Target) -> Outcome {
        if !t.is_live() {
            return Outcome::na("only the running daemon shows it");
        }
        let mut f = Findings::new();
        if !self.info.is_empty() {
            let info = t
                .stdout("docker", &["info", "--format", "{{json .}}"])
                .and_then(|s| {
                    serde_json::from_str::<Value>(&s).map_err(|e| format!("docker info: {e}"))
                });
            match info {
                Ok(doc) => keypath::check_keys(&mut f, &doc, &self.info, "docker info"),
                Err(e) => f.err(e),
            }
        }
        if let Some(rules) = &self.containers {
            match running_containers(t) {
                Ok(list) if list.is_empty() => f.ok("no container is running"),
                Ok(list) => {
                    for c in &list {
                        let name = container_name(c);
                        for p in &rules.forbid {
                            let has = p.of(c);
                            f.check(!has, format!("{name}: {}: {}", p.name(), yes_no(has)));
                        }
                        for p in &rules.require {
                            let has = p.of(c);
                            f.check(has, format!("{name}: {}: {}", p.name(), yes_no(has)));
                        }
                    }
                }
                Err(e) => f.err(e),
            }
        }
        f.finish()
    }
}

/// `docker inspect` of every running container.
fn running_containers(t: &Target) -> Result<Vec<Value>, String> {
    let ids = t.stdout("docker", &["ps", "--quiet", "--no-trunc"])?;
    let ids: Vec<&str> = ids.split_whitespace().collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut args = vec!["inspect", "--type", "container"];
    args.extend(ids);
    let out = t.stdout("docker", &args)?;
    serde_json::from_str(&out).map_err(|e| format!("docker inspect: {e}"))
}

crate::register_kind!("docker", DockerCheck);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::check::parse_check;
    use serde_json::json;

    #[test]
    fn container_properties_come_from_docker_inspect() {
        let hardened = json!({
            "Id": "0123456789abcdef", "Name": "/web",
            "AppArmorProfile": "docker-default",
            "Mounts": [], "Config": {"User": "65534:65534"},
            "HostConfig": {"Privileged": false, "Devices": [], "PortBindings": {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}]}, "NetworkMode": "none", "ReadonlyRootfs": true,
                "Memory": 67108864, "NanoCpus": 500000000, "PidsLimit": 64, "CpusetCpus": "",
                "SecurityOpt": ["no-new-privileges"], "CapAdd": null,
                "RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 5}}
        });
        let privileged = json!({
            "Id": "fedcba9876543210", "Name": "/bad",
            "AppArmorProfile": "unconfined",
            "Mounts": [{"Type": "bind", "Source": "/run/docker.sock"}, {"Type": "bind", "Source": "/etc", "Propagation": "rshared"}],
            "Config": {"User": ""},
            "HostConfig": {"Privileged": true, "Devices": [{"PathOnHost": "/dev/sda"}], "CgroupParent": "/evil",
                "PortBindings": {"80/tcp": [{"HostIp": "", "HostPort": "80"}]}, "NetworkMode": "host", "ReadonlyRootfs": false,
                "Memory": 0, "NanoCpus": 0, "CpuQuota": 0, "CpusetCpus": "", "CapAdd": ["SYS_ADMIN"],
                "SecurityOpt": ["seccomp=unconfined"], "UsernsMode": "host",
                "RestartPolicy": {"Name": "always", "MaximumRetryCount": 0}}
        });
        use Property::*;
        for p in [
            Privileged,
            HostNetwork,
            HostUserns,
            DockerSocket,
            UnconfinedSeccomp,
            UnconfinedApparmor,
            AddedCapabilities,
            HostDevices,
            SharedPropagation,
            SensitiveMounts,
            PortsOnAllInterfaces,
            CustomCgroupParent,
            RootUser,
        ] {
            assert!(p.of(&privileged), "{p:?}");
            assert!(!p.of(&hardened), "{p:?}");
        }
        for p in [
            ReadOnlyRoot,
            MemoryLimit,
            CpuLimit,
            PidsLimit,
            BoundedRestart,
        ] {
            assert!(p.of(&hardened), "{p:?}");
            assert!(!p.of(&privileged), "{p:?}");
        }
        assert_eq!(container_name(&hardened), "web (0123456789ab)");
    }

    #[test]
    fn offline_there_is_no_daemon_and_empty_checks_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let c = parse_check("docker: { containers: { forbid: [privileged] } }").unwrap();
        let t = Target::root(d.path()).unwrap();
        assert_eq!(
            c.eval(&t).status,
            crate::scan::outcome::Status::NotApplicable
        );
        assert!(parse_check("docker: {}").unwrap().validate().is_err());
        assert!(
            parse_check("docker: { containers: {} }")
                .unwrap()
                .validate()
                .is_err()
        );
        assert!(parse_check("docker: { containers: { forbid: [flying] } }").is_err());
    }
}
