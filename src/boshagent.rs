//! The BOSH agent slot. bosh-agent is in no package registry stemforge
//! reaches, so the image takes whatever agent binary the user gives
//! (`--bosh-agent FILE`): it goes to `/var/vcap/bosh/bin/bosh-agent`, with
//! BOSH's `/var/vcap` layout, an `agent.json` and a systemd unit that
//! starts it at boot, after cloud-init. Without one the stemcells are still
//! complete and `stemcell.MF` says no agent is installed.

use crate::chroot::Chroot;
use crate::config::ConfigError;
use crate::osimage::place_file;
use crate::scan::target::Target;
use anyhow::{Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub const BINARY: &str = "/var/vcap/bosh/bin/bosh-agent";
pub const UNIT: &str = "bosh-agent";

/// BOSH's directories under /var/vcap (root-owned; `data` and `store` are
/// mount points the agent fills at first boot).
const DIRS: &[(&str, u32)] = &[
    ("/var/vcap", 0o755),
    ("/var/vcap/bosh", 0o755),
    ("/var/vcap/bosh/bin", 0o755),
    ("/var/vcap/bosh/etc", 0o755),
    ("/var/vcap/bosh/log", 0o700),
    ("/var/vcap/data", 0o755),
    ("/var/vcap/store", 0o700),
    ("/var/vcap/jobs", 0o755),
    ("/var/vcap/packages", 0o755),
    ("/var/vcap/sys", 0o755),
    ("/var/vcap/sys/log", 0o755),
    ("/var/vcap/sys/run", 0o755),
];

const SERVICE: &str = "# stemforge: the BOSH agent given with --bosh-agent.
[Unit]
Description=BOSH agent
Wants=network-online.target
After=network-online.target cloud-init.service
# (not cloud-final.service: it runs after multi-user.target, which wants
# this unit, and would make an ordering cycle)

[Service]
ExecStart=/var/vcap/bosh/bin/bosh-agent -P ubuntu -C /var/vcap/bosh/agent.json
Restart=always
RestartSec=5

[Install]
WantedBy=multi-user.target
";

/// The agent's settings: where it looks for its IaaS settings, in the
/// order the supported clouds offer them (vSphere's CD-ROM, OpenStack's
/// config drive, the EC2/OpenStack metadata service).
const AGENT_JSON: &str = r#"{
  "Platform": {
    "Linux": {
      "CreatePartitionIfNoEphemeralDisk": true,
      "DevicePathResolutionType": "virtio"
    }
  },
  "Infrastructure": {
    "Settings": {
      "Sources": [
        { "Type": "CDROM", "FileName": "env" },
        {
          "Type": "ConfigDrive",
          "DiskPaths": ["/dev/disk/by-label/CONFIG-2", "/dev/disk/by-label/config-2"],
          "MetaDataPath": "ec2/latest/meta-data.json",
          "UserDataPath": "ec2/latest/user-data"
        },
        { "Type": "HTTP", "URI": "http://169.254.169.254" }
      ],
      "UseServerName": false,
      "UseRegistry": false
    }
  }
}
"#;

/// Check `--bosh-agent FILE` before any work: a regular, executable file.
/// Returns how the manifest and stemcell.MF name it (its SHA-256 prefix).
pub fn check(file: &Path) -> Result<String> {
    let bad = |why: String| -> anyhow::Error {
        ConfigError::new("--bosh-agent", format!("{}: {why}", file.display())).into()
    };
    let md = std::fs::metadata(file).map_err(|e| bad(e.to_string()))?;
    if !md.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if md.permissions().mode() & 0o111 == 0 {
        return Err(bad("not executable (chmod +x it)".into()));
    }
    let hash = crate::formats::manifest::sha256_file(file)?;
    Ok(format!("sha256:{}", &hash[..16]))
}

/// Install the agent into the tree and enable its unit.
pub fn install(chroot: &Chroot, file: &Path) -> Result<()> {
    let t = Target::root(chroot.root())?;
    for (dir, mode) in DIRS {
        let host = t.resolve_with(dir, false)?;
        std::fs::create_dir_all(&host).with_context(|| format!("creating {dir}"))?;
        std::fs::set_permissions(&host, std::fs::Permissions::from_mode(*mode))
            .with_context(|| format!("chmod {dir}"))?;
    }
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let (bin, _) = place_file(&t, BINARY, &bytes)?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {BINARY}"))?;
    place_file(&t, "/var/vcap/bosh/agent.json", AGENT_JSON.as_bytes())?;
    place_file(
        &t,
        &format!("/etc/systemd/system/{UNIT}.service"),
        SERVICE.as_bytes(),
    )?;
    chroot
        .run(&["systemctl", "enable", UNIT])
        .context("enabling the BOSH agent")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_file_is_checked_before_any_work() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("agent");
        let e = check(&f).unwrap_err();
        assert!(e.downcast_ref::<ConfigError>().is_some(), "{e}");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        let e = check(&f).unwrap_err().to_string();
        assert!(
            e.contains("--bosh-agent") && e.contains("not executable"),
            "{e}"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check(&f).unwrap().starts_with("sha256:"));
        assert!(check(d.path()).is_err());
        let _: serde_json::Value = serde_json::from_str(AGENT_JSON).unwrap();
    }
}
