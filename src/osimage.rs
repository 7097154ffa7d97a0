//! From a bootstrapped tree to the hardened image tree: apply the stages in
//! order, install stemforge itself (scanner, verification agent, catalog),
//! record what was built, and remove every host leftover and secret.

use crate::chroot::Chroot;
use crate::fsutil;
use crate::profile::Profile;
use crate::progress;
use crate::scan::kinds::package::{DPKG_STATUS, installed};
use crate::scan::kinds::service::{UnitState, offline_state, unit_name};
use crate::scan::target::Target;
use crate::scan::users::Users;
use crate::scan::{IMAGE_INFO, ImageInfo};
use crate::stage::Stage;
use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where stemforge lives in the image.
pub const AGENT_BINARY: &str = "/usr/lib/stemforge/stemforge";
pub const AGENT_CATALOG: &str = "/usr/share/stemforge/stages";

/// What applying the stages changed that later steps care about.
#[derive(Debug, Default)]
pub struct Applied {
    pub stages: Vec<String>,
    /// modprobe.d or initramfs configuration changed: rebuild the initramfs.
    pub initramfs_dirty: bool,
}

/// Apply `stages` (already filtered for the profile) to the tree: the
/// packages, then each stage in order.
pub fn apply_stages(chroot: &Chroot, stages: &[&Stage]) -> Result<Applied> {
    let (missing, purge) = package_changes(chroot.root(), stages)?;
    prepare(chroot, &missing, &purge)?;
    let mut applied = Applied::default();
    for stage in stages {
        applied.initramfs_dirty |= apply_stage(chroot, stage)?;
        applied.stages.push(stage.dir_name.clone());
    }
    Ok(applied)
}

/// The packages `stages` install that the tree lacks, and the ones they
/// purge that it has (both sorted).
pub fn package_changes(root: &Path, stages: &[&Stage]) -> Result<(Vec<String>, Vec<String>)> {
    let status = std::fs::read_to_string(root.join(DPKG_STATUS.trim_start_matches('/')))
        .context("reading the dpkg status of the tree")?;
    let have = installed(&status);
    let (distro, codename) = os_of(root)?;
    let missing: Vec<String> = stages
        .iter()
        .flat_map(|s| s.packages.install_for(&distro, &codename))
        .filter(|p| !have.contains(p))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let purge: Vec<String> = stages
        .iter()
        .flat_map(|s| s.packages.purge.iter())
        .filter(|p| have.contains(*p))
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    Ok((missing, purge))
}

/// Ready the tree for the stages (no service starts, the host's resolver)
/// and install and purge packages: bootstrap installed every base
/// `install`; roles' packages and purges come here.
pub fn prepare(chroot: &Chroot, missing: &[String], purge: &[String]) -> Result<()> {
    chroot.deny_service_starts()?;
    use_host_resolver(chroot.root())?;
    if !missing.is_empty() {
        progress::activity("apt-get install");
        let mut argv = vec!["apt-get", "install", "-y", "--no-install-recommends"];
        argv.extend(missing.iter().map(|s| s.as_str()));
        chroot.run(&argv).context("installing stage packages")?;
    }
    if !purge.is_empty() {
        progress::activity("apt-get purge");
        let mut argv = vec!["apt-get", "purge", "-y"];
        argv.extend(purge.iter().map(|s| s.as_str()));
        chroot
            .run(&argv)
            .context("purging packages the stages forbid")?;
    }
    Ok(())
}

/// Apply one stage; whether the initramfs must be rebuilt.
pub fn apply_stage(chroot: &Chroot, stage: &Stage) -> Result<bool> {
    progress::activity(&format!("stage {}", stage.dir_name));
    progress::detail(&format!("applying stage {}", stage.dir_name));
    let loaded = Users::load(&Target::root(chroot.root())?);
    let users = loaded
        .as_ref()
        .as_ref()
        .map_err(|e| anyhow::anyhow!("reading the tree's users: {e}"))?;
    let mut applied = Applied::default();
    apply_one(chroot, stage, users, &mut applied)
        .with_context(|| format!("stage {} ({})", stage.dir_name, stage.source.display()))?;
    Ok(applied.initramfs_dirty)
}

/// While stages run, name resolution in the tree uses the build host's
/// resolver (apt and scripts may need the network); `finalize` puts the
/// image's own resolv.conf (or none) back.
fn use_host_resolver(root: &Path) -> Result<()> {
    let inside = root.join("etc/resolv.conf");
    if inside.symlink_metadata().is_ok() {
        std::fs::remove_file(&inside).context("replacing /etc/resolv.conf for the build")?;
    }
    match std::fs::read("/etc/resolv.conf") {
        Ok(text) => std::fs::write(&inside, text).context("writing the build's /etc/resolv.conf"),
        Err(_) => Ok(()),
    }
}

fn apply_one(chroot: &Chroot, stage: &Stage, users: &Users, applied: &mut Applied) -> Result<()> {
    let root = chroot.root();
    let t = Target::root(root)?;
    for f in &stage.files {
        let bytes = stage.file_bytes(f);
        let (dest, changed) = place_file(&t, &f.path, &bytes)?;
        set_owner_mode(
            &dest,
            &f.path,
            Some(f.mode),
            Some(&f.owner),
            Some(&f.group),
            users,
        )?;
        if in_initramfs(&f.path) && changed {
            applied.initramfs_dirty = true;
        }
    }
    for p in &stage.permissions {
        let matches = t.glob(&p.path)?;
        if matches.is_empty() && !p.path.contains(['*', '?', '[']) {
            bail!("permissions: {} does not exist", p.path);
        }
        for m in matches {
            let host = t.resolve_with(&m, false)?;
            if host.symlink_metadata()?.file_type().is_symlink() {
                continue;
            }
            set_owner_mode(
                &host,
                &m,
                p.mode,
                p.owner.as_deref(),
                p.group.as_deref(),
                users,
            )?;
        }
    }
    if !stage.sysctl.is_empty() {
        let mut text = format!("# stemforge: stages/{}\n", stage.dir_name);
        for (k, v) in &stage.sysctl {
            text.push_str(&format!("{k} = {v}\n"));
        }
        write_config(
            &t,
            // 99-: after systemd's 99-protect-links.conf, which would win otherwise.
            &format!("/etc/sysctl.d/99-stemforge-{}.conf", stage.name),
            &text,
        )?;
    }
    if let Some((path, text)) = modprobe_config(stage) {
        // The bootstrap seeded this file before the kernel was installed,
        // so the initramfs already has it unless it changed since.
        if write_config(&t, &path, &text)? {
            applied.initramfs_dirty = true;
        }
    }
    let s = &stage.services;
    if !s.enable.is_empty() {
        let mut argv = vec!["systemctl", "enable"];
        argv.extend(s.enable.iter().map(|u| u.as_str()));
        chroot.run(&argv).context("enabling services")?;
    }
    // Disabling an absent unit is already done.
    let present: Vec<&String> = s
        .disable
        .iter()
        .filter(|u| !matches!(offline_state(&t, &unit_name(u)), Ok(UnitState::Absent)))
        .collect();
    if !present.is_empty() {
        let mut argv = vec!["systemctl", "disable"];
        argv.extend(present.iter().map(|u| u.as_str()));
        chroot.run(&argv).context("disabling services")?;
    }
    if !s.mask.is_empty() {
        let mut argv = vec!["systemctl", "mask"];
        argv.extend(s.mask.iter().map(|u| u.as_str()));
        chroot.run(&argv).context("masking services")?;
    }
    if let Some((name, body)) = &stage.script {
        chroot.run_script(&format!("stages/{}/{name}", stage.dir_name), body)?;
    }
    Ok(())
}

/// Put `bytes` at the in-tree `path`: parents created, a symlink there
/// replaced (never written through, so nothing lands outside the tree).
/// Returns the host path and whether the content changed.
pub fn place_file(t: &Target, path: &str, bytes: &[u8]) -> Result<(PathBuf, bool)> {
    let dest = t.resolve_with(path, false)?;
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let is_link = dest
        .symlink_metadata()
        .map(|m| m.file_type().is_symlink())
        .unwrap_or(false);
    if is_link {
        std::fs::remove_file(&dest).with_context(|| format!("replacing symlink {path}"))?;
    }
    let changed = std::fs::read(&dest).map(|old| old != bytes).unwrap_or(true);
    std::fs::write(&dest, bytes).with_context(|| format!("writing {path}"))?;
    Ok((dest, changed))
}

/// Write a configuration file (mode 0644); whether its content changed.
fn write_config(t: &Target, path: &str, text: &str) -> Result<bool> {
    let (dest, changed) = place_file(t, path, text.as_bytes())?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("chmod {path}"))?;
    Ok(changed)
}

/// The modprobe.d file of a stage that disables kernel modules.
pub fn modprobe_config(stage: &Stage) -> Option<(String, String)> {
    if stage.kernel_modules.disable.is_empty() {
        return None;
    }
    let mut text = format!(
        "# stemforge: stages/{}. `install ... /bin/false` refuses even explicit loads;\n# `blacklist` stops loading by alias.\n",
        stage.dir_name
    );
    for m in &stage.kernel_modules.disable {
        text.push_str(&format!("install {m} /bin/false\nblacklist {m}\n"));
    }
    Some((
        format!("/etc/modprobe.d/stemforge-{}.conf", stage.name),
        text,
    ))
}

/// Files the bootstrap places before any package installs, so the
/// initramfs the kernel package builds already carries them: the
/// initramfs-tools settings and the stages' modprobe.d files.
pub fn seed_files(stages: &[&Stage]) -> Vec<(String, String)> {
    let mut files = vec![(
        "/etc/initramfs-tools/conf.d/stemforge.conf".to_string(),
        crate::bootstrap::INITRAMFS_CONF.to_string(),
    )];
    files.extend(stages.iter().filter_map(|s| modprobe_config(s)));
    // Stage files the initramfs reads (its module list, modprobe.d).
    for st in stages {
        for f in st.files.iter().filter(|f| in_initramfs(&f.path)) {
            let text = String::from_utf8_lossy(&st.file_bytes(f)).into_owned();
            files.push((f.path.clone(), text));
        }
    }
    files
}

/// Whether the initramfs carries a copy of `path` (so changing it means
/// rebuilding the initramfs).
fn in_initramfs(path: &str) -> bool {
    path.starts_with("/etc/modprobe.d/")
        || path.starts_with("/etc/initramfs-tools/")
        || path.starts_with("/usr/share/initramfs-tools/modules.d/")
}

fn set_owner_mode(
    host: &Path,
    shown: &str,
    mode: Option<u32>,
    owner: Option<&str>,
    group: Option<&str>,
    users: &Users,
) -> Result<()> {
    if owner.is_some() || group.is_some() {
        let md = host.metadata().with_context(|| format!("stat {shown}"))?;
        use std::os::unix::fs::MetadataExt;
        let uid = match owner {
            Some(o) => users
                .uid_of(o)
                .with_context(|| format!("{shown}: user {o} does not exist in the image"))?,
            None => md.uid(),
        };
        let gid = match group {
            Some(g) => users
                .gid_of(g)
                .with_context(|| format!("{shown}: group {g} does not exist in the image"))?,
            None => md.gid(),
        };
        fsutil::lchown(host, uid, gid)?;
    }
    if let Some(m) = mode {
        std::fs::set_permissions(host, std::fs::Permissions::from_mode(m))
            .with_context(|| format!("chmod {m:o} {shown}"))?;
    }
    Ok(())
}

/// Files of the verification agent, as (path, mode, content).
pub type AgentFile = (&'static str, u32, String);

/// Install stemforge into the image: the binary (for live scans and the
/// verification agent), the catalog it was built with, the agent's unit
/// and udev rule, and the image record.
pub fn install_stemforge(
    root: &Path,
    binary: &Path,
    catalog_dir: Option<&Path>,
    agent_files: &[AgentFile],
    info: &ImageInfo,
) -> Result<()> {
    let t = Target::root(root)?;
    let bin = t.resolve_with(AGENT_BINARY, false)?;
    std::fs::create_dir_all(bin.parent().expect("has a parent"))?;
    std::fs::copy(binary, &bin)
        .with_context(|| format!("copying {} into the image", binary.display()))?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))?;
    let link = t.resolve_with("/usr/sbin/stemforge", false)?;
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("../lib/stemforge/stemforge", &link)
        .context("linking /usr/sbin/stemforge")?;
    let cat = t.resolve_with(AGENT_CATALOG, false)?;
    fsutil::remove_tree(&cat)?;
    std::fs::create_dir_all(&cat).with_context(|| format!("creating {AGENT_CATALOG}"))?;
    match catalog_dir {
        Some(dir) => copy_stage_files(dir, &cat)?,
        None => crate::assets::STAGES
            .extract(&cat)
            .with_context(|| format!("writing the catalog to {AGENT_CATALOG}"))?,
    }
    for (path, mode, content) in agent_files {
        let (dest, _) = place_file(&t, path, content.as_bytes())?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(*mode))
            .with_context(|| format!("chmod {path}"))?;
    }
    place_file(&t, IMAGE_INFO, &serde_json::to_vec_pretty(info)?)?;
    Ok(())
}

fn copy_stage_files(src: &Path, dst: &Path) -> Result<()> {
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let p = entry?.path();
        let to = dst.join(p.file_name().expect("entries have names"));
        if p.is_dir() {
            std::fs::create_dir_all(&to)?;
            copy_stage_files(&p, &to)?;
        } else {
            std::fs::copy(&p, &to).with_context(|| format!("copying {}", p.display()))?;
        }
    }
    Ok(())
}

/// The image record for a profile.
pub fn image_info(p: &Profile, stages: &[String], epoch: i64) -> ImageInfo {
    ImageInfo {
        profile: p.name.clone(),
        distro: p.os.distro.clone(),
        codename: p.os.codename.clone(),
        version: p.os.version.clone(),
        roles: p.roles.clone(),
        stages: stages.to_vec(),
        stemforge_version: crate::VERSION.to_string(),
        built: chrono::DateTime::from_timestamp(epoch, 0)
            .unwrap_or_default()
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string(),
    }
}

/// Remove everything that must not ship: service-start policy, SSH host
/// keys, machine identity, the build host's hostname and resolver, apt
/// lists and caches, logs and temporary files. Rebuild the initramfs when
/// stages changed what it carries.
pub fn finalize(chroot: &Chroot, rebuild_initramfs: bool) -> Result<()> {
    let root = chroot.root().to_path_buf();
    let t = Target::root(&root)?;
    if rebuild_initramfs {
        progress::activity("update-initramfs");
        chroot
            .run(&["update-initramfs", "-u", "-k", "all"])
            .context("rebuilding the initramfs")?;
    }
    progress::activity("apt-get clean");
    chroot
        .run(&["apt-get", "clean"])
        .context("cleaning the apt cache")?;
    chroot.allow_service_starts()?;

    let host = |p: &str| -> Result<PathBuf> { Ok(t.resolve_with(p, false)?) };
    for key in t.glob("/etc/ssh/ssh_host_*")? {
        std::fs::remove_file(host(&key)?).with_context(|| format!("removing {key}"))?;
    }
    for list in t.glob("/var/lib/apt/lists/*_*")? {
        std::fs::remove_file(host(&list)?).with_context(|| format!("removing {list}"))?;
    }
    for old in t.glob("/var/cache/debconf/*-old")? {
        std::fs::remove_file(host(&old)?).with_context(|| format!("removing {old}"))?;
    }
    // ldconfig's auxiliary cache records the libraries' inode numbers and
    // change times: build noise, never the same twice. ldconfig makes it
    // again when it next runs.
    let aux = host("/var/cache/ldconfig/aux-cache")?;
    if aux.symlink_metadata().is_ok() {
        std::fs::remove_file(&aux).context("removing ldconfig's aux-cache")?;
    }
    // An empty machine-id: systemd makes one at first boot.
    std::fs::write(host("/etc/machine-id")?, b"").context("emptying /etc/machine-id")?;
    let dbus_id = host("/var/lib/dbus/machine-id")?;
    if dbus_id.symlink_metadata().is_ok() {
        std::fs::remove_file(&dbus_id).context("removing /var/lib/dbus/machine-id")?;
        std::os::unix::fs::symlink("/etc/machine-id", &dbus_id)
            .context("linking /var/lib/dbus/machine-id")?;
    }
    let seed = host("/var/lib/systemd/random-seed")?;
    if seed.exists() {
        std::fs::remove_file(&seed).context("removing the random seed")?;
    }
    std::fs::write(host("/etc/hostname")?, b"localhost\n").context("writing /etc/hostname")?;
    std::fs::write(
        host("/etc/hosts")?,
        "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n",
    )
    .context("writing /etc/hosts")?;
    let resolv = host("/etc/resolv.conf")?;
    if resolv.symlink_metadata().is_ok() {
        std::fs::remove_file(&resolv).context("removing the build host's /etc/resolv.conf")?;
    }
    if t.exists("/lib/systemd/system/systemd-resolved.service") {
        std::os::unix::fs::symlink("../run/systemd/resolve/stub-resolv.conf", &resolv)
            .context("linking /etc/resolv.conf to systemd-resolved")?;
    }
    // Logs of the build: keep the files (their modes and owners matter),
    // drop their contents.
    truncate_files(&host("/var/log")?)?;
    for dir in ["/tmp", "/var/tmp"] {
        let d = host(dir)?;
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {dir}"))? {
            let p = entry?.path();
            if p.is_dir() && !p.is_symlink() {
                fsutil::remove_tree(&p)?;
            } else {
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
    }
    Ok(())
}

fn truncate_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = entry?.path();
        let md = p.symlink_metadata()?;
        if md.is_dir() {
            truncate_files(&p)?;
        } else if md.is_file() && md.len() > 0 {
            std::fs::File::options()
                .write(true)
                .open(&p)
                .and_then(|f| f.set_len(0))
                .with_context(|| format!("truncating {}", p.display()))?;
        }
    }
    Ok(())
}

/// The distro (`ID`) and codename of the tree at `root`.
fn os_of(root: &Path) -> Result<(String, String)> {
    let ctx = crate::scan::ScanContext::detect(&Target::root(root)?, None);
    Ok((ctx.distro, ctx.codename))
}
