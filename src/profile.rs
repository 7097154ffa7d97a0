//! OS profiles: which distribution, which mirror and packages, which disk
//! layout, which roles. One YAML file per OS under `os-profiles/`; a profile
//! may `extends:` another and override whole keys.

use crate::assets;
use crate::config::{ConfigError, locate, parse_size, parse_yaml};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The profile `stemforge build` uses when none is named.
pub const DEFAULT_PROFILE: &str = "ubuntu-noble";

/// Space the GPT needs around the partitions: 1 MiB before the first
/// partition (alignment) and 1 MiB at the end for the backup table.
pub const GPT_OVERHEAD: u64 = 2 << 20;
/// The BIOS boot partition of a hybrid disk (GRUB's core.img goes there).
pub const BIOS_BOOT_SIZE: u64 = 1 << 20;
/// The largest disk or partition a profile may ask for: the largest file
/// ext4 holds (the raw image is a file on the build host) and the largest
/// volume the clouds take (an AWS EBS volume).
pub const MAX_DISK_SIZE: u64 = 16 << 40;

/// The outputs of a profile that names none.
pub const DEFAULT_FORMATS: &[crate::formats::Format] =
    &[crate::formats::Format::Raw, crate::formats::Format::Qcow2];

/// A loaded, validated profile.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// The file it came from (and the files it extends), for messages.
    pub sources: Vec<PathBuf>,
    pub os: OsInfo,
    pub bootstrap: Bootstrap,
    pub kernel: String,
    pub packages: Vec<String>,
    pub disk: Disk,
    pub boot: Boot,
    pub roles: Vec<String>,
    /// Role inputs by name: (the file, the profile that names it).
    /// Relative files are taken from that profile's directory.
    pub role_inputs: BTreeMap<String, (PathBuf, PathBuf)>,
    /// The outputs a build writes unless `--format` says otherwise.
    pub formats: Vec<crate::formats::Format>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsInfo {
    pub distro: String,
    pub codename: String,
    pub version: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Bootstrap {
    pub mirror: String,
    pub suites: Vec<String>,
    /// Suites served from another mirror (Debian's security archive).
    pub suite_mirrors: BTreeMap<String, String>,
    pub components: Vec<String>,
    pub keyring: String,
    pub variant: String,
    pub dpkg_path_exclude: Vec<String>,
    pub dpkg_path_include: Vec<String>,
}

impl Bootstrap {
    /// The mirror a suite is fetched from.
    pub fn mirror_for(&self, suite: &str) -> &str {
        self.suite_mirrors
            .get(suite)
            .map(String::as_str)
            .unwrap_or(&self.mirror)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Disk {
    /// Total size of the disk image in bytes.
    pub size: u64,
    pub partitions: Vec<Partition>,
    /// fstab entries that are not partitions (tmpfs, bind mounts).
    pub mounts: Vec<ExtraMount>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Vfat,
}

impl FsType {
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Vfat => "vfat",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Partition {
    pub mount: String,
    pub fs: FsType,
    pub size: u64,
    pub options: Vec<String>,
    /// File-system label and GPT partition name.
    pub label: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExtraMount {
    pub mount: String,
    /// `tmpfs`, or `bind` with `source`.
    pub kind: ExtraMountKind,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExtraMountKind {
    Tmpfs,
    Bind { source: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct Boot {
    pub cmdline: Vec<String>,
    pub timeout: u32,
    /// A hybrid disk: a BIOS boot partition and GRUB for i386-pc beside
    /// the ESP, so BIOS firmware boots the same disk.
    pub bios: bool,
    /// The UEFI path boots through the distribution's signed shim and
    /// signed GRUB.
    pub secure_boot: bool,
}

/// The packages each boot option needs in the image.
pub const BIOS_PACKAGES: &[&str] = &["grub-pc-bin"];
pub const SECURE_BOOT_PACKAGES: &[&str] = &["shim-signed", "grub-efi-amd64-signed"];

// ---------------------------------------------------------------------------
// The file format: every key optional so `extends` can override any of them.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    extends: Option<String>,
    name: Option<String>,
    description: Option<String>,
    os: Option<OsInfo>,
    bootstrap: Option<BootstrapFile>,
    kernel: Option<String>,
    packages: Option<Vec<String>>,
    disk: Option<DiskFile>,
    boot: Option<BootFile>,
    roles: Option<Vec<String>>,
    role_inputs: Option<BTreeMap<String, PathBuf>>,
    formats: Option<Vec<String>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BootstrapFile {
    mirror: Option<String>,
    suites: Option<Vec<String>>,
    suite_mirrors: Option<BTreeMap<String, String>>,
    components: Option<Vec<String>>,
    keyring: Option<String>,
    variant: Option<String>,
    dpkg_path_exclude: Option<Vec<String>>,
    dpkg_path_include: Option<Vec<String>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskFile {
    size: Option<SizeText>,
    partitions: Option<Vec<PartitionFile>>,
    mounts: Option<Vec<MountFile>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartitionFile {
    mount: String,
    fs: FsType,
    size: SizeText,
    #[serde(default)]
    options: Vec<String>,
    label: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MountFile {
    mount: String,
    fs: Option<String>,
    bind: Option<String>,
    #[serde(default)]
    options: Vec<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BootFile {
    cmdline: Option<Vec<String>>,
    timeout: Option<u32>,
    bios: Option<bool>,
    secure_boot: Option<bool>,
}

/// A size as written: `512MiB` or a plain number of bytes.
#[derive(Debug, Clone)]
enum SizeText {
    Text(String),
    Bytes(u64),
}

impl<'de> Deserialize<'de> for SizeText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SizeText, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = SizeText;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size such as 512MiB or 2GiB, or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SizeText, E> {
                Ok(SizeText::Bytes(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SizeText, E> {
                u64::try_from(v)
                    .map(SizeText::Bytes)
                    .map_err(|_| E::custom(format!("invalid size {v} (a size is not negative)")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SizeText, E> {
                Ok(SizeText::Text(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl SizeText {
    fn as_text(&self) -> String {
        match self {
            SizeText::Text(s) => s.clone(),
            SizeText::Bytes(b) => b.to_string(),
        }
    }
}

/// One profile file read from disk or from the compiled-in set.
struct Loaded {
    path: PathBuf,
    text: String,
    file: ProfileFile,
}

/// Where profiles are looked up.
#[derive(Debug, Clone)]
pub enum ProfileSource {
    /// The profiles compiled into the binary.
    Embedded,
    /// A directory of `NAME.yml` files.
    Dir(PathBuf),
}

impl ProfileSource {
    /// Names of all profiles here, sorted.
    pub fn names(&self) -> anyhow::Result<Vec<String>> {
        let mut names: Vec<String> = match self {
            ProfileSource::Embedded => assets::PROFILES
                .files()
                .filter_map(|f| yml_stem(f.path()))
                .collect(),
            ProfileSource::Dir(d) => {
                use anyhow::Context;
                std::fs::read_dir(d)
                    .with_context(|| format!("reading profile directory {}", d.display()))?
                    .filter_map(|e| e.ok())
                    .filter_map(|e| yml_stem(&e.path()))
                    .collect()
            }
        };
        names.sort();
        Ok(names)
    }

    /// The profile `name` here, its path and text; `None` when there is
    /// no such profile.
    fn read(&self, name: &str) -> Result<Option<(PathBuf, String)>, ConfigError> {
        let file = format!("{name}.yml");
        match self {
            ProfileSource::Embedded => Ok(assets::PROFILES.get_file(&file).map(|f| {
                (
                    Path::new("os-profiles").join(&file),
                    f.contents_utf8().unwrap_or_default().to_string(),
                )
            })),
            ProfileSource::Dir(d) => read_profile_file(&d.join(&file)),
        }
    }
}

/// A profile file found by its name in a directory; `None` when there is
/// none. Anything but a regular file is an error, not opened: reading a
/// FIFO would block for ever.
fn read_profile_file(p: &Path) -> Result<Option<(PathBuf, String)>, ConfigError> {
    let cannot = |e: std::io::Error| ConfigError::new(p, format!("cannot read profile: {e}"));
    let md = match std::fs::metadata(p) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(cannot(e)),
    };
    if !md.is_file() {
        return Err(ConfigError::new(
            p,
            "cannot read profile: not a regular file (a FIFO, a directory?)",
        ));
    }
    let text = std::fs::read_to_string(p).map_err(cannot)?;
    Ok(Some((p.to_path_buf(), text)))
}

/// A profile name as `extends:` may give it: no path.
fn is_profile_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn yml_stem(p: &Path) -> Option<String> {
    (p.extension()? == "yml").then(|| p.file_stem().map(|s| s.to_string_lossy().into_owned()))?
}

/// Load a profile by name (from `source`) or by path (`x/y.yml`).
pub fn load(name_or_path: &str, source: &ProfileSource) -> Result<Profile, ConfigError> {
    let first = if name_or_path.contains('/') || name_or_path.ends_with(".yml") {
        let p = PathBuf::from(name_or_path);
        let text = std::fs::read_to_string(&p)
            .map_err(|e| ConfigError::new(&p, format!("cannot read profile: {e}")))?;
        (p, text)
    } else {
        source.read(name_or_path)?.ok_or_else(|| {
            let known = source.names().unwrap_or_default().join(", ");
            ConfigError::new(
                PathBuf::from(format!("{name_or_path}.yml")),
                format!("no such profile `{name_or_path}` (known: {known})"),
            )
        })?
    };
    let mut chain: Vec<Loaded> = Vec::new();
    let (mut path, mut text) = first;
    loop {
        let file: ProfileFile = parse_yaml(&path, &text)?;
        let parent = file.extends.clone();
        if chain.iter().any(|l| l.path == path) {
            return Err(ConfigError::at(
                &path,
                &text,
                "extends",
                r"^extends:",
                "profiles extend each other in a loop",
            ));
        }
        chain.push(Loaded { path, text, file });
        let Some(parent) = parent else { break };
        // A parent is named, not given as a path: a profile cannot pull in
        // a file from elsewhere on the host.
        if !is_profile_name(&parent) {
            let l = chain.last().expect("chain has the child");
            return Err(ConfigError::at(
                &l.path,
                &l.text,
                "extends",
                r"^extends:",
                format!(
                    "`{parent}` is not a profile name (extends names a profile beside this \
                     file, in --profiles-dir or built in; not a path)"
                ),
            ));
        }
        let here = chain.last().map(|l| l.path.clone()).unwrap_or_default();
        let sibling = here.parent().map(|d| d.join(format!("{parent}.yml")));
        let mut found = match sibling {
            Some(p) => read_profile_file(&p)?,
            None => None,
        };
        if found.is_none() {
            found = source.read(&parent)?;
        }
        if found.is_none() {
            found = ProfileSource::Embedded.read(&parent)?;
        }
        match found {
            Some((p, t)) => {
                path = p;
                text = t;
            }
            None => {
                let l = chain.last().expect("chain has the child");
                return Err(ConfigError::at(
                    &l.path,
                    &l.text,
                    "extends",
                    r"^extends:",
                    format!("profile `{parent}` not found"),
                ));
            }
        }
    }
    for l in &chain {
        check_file(l)?;
    }
    merge(chain)
}

/// Checks one file can make on its own values (formats, names, paths).
fn check_file(l: &Loaded) -> Result<(), ConfigError> {
    let f = &l.file;
    let err =
        |key: &str, needle: &str, msg: String| ConfigError::at(&l.path, &l.text, key, needle, msg);
    if let Some(os) = &f.os {
        if !["debian", "ubuntu"].contains(&os.distro.as_str()) {
            return Err(err(
                "os.distro",
                "distro:",
                format!(
                    "unsupported distro `{}` (supported: debian, ubuntu)",
                    os.distro
                ),
            ));
        }
    }
    if let Some(b) = &f.bootstrap {
        let mut mirrors: Vec<(&str, &String)> = Vec::new();
        if let Some(m) = &b.mirror {
            mirrors.push(("bootstrap.mirror", m));
        }
        if let Some(sm) = &b.suite_mirrors {
            for m in sm.values() {
                mirrors.push(("bootstrap.suite_mirrors", m));
            }
        }
        for (key, m) in mirrors {
            if !(m.starts_with("http://") || m.starts_with("https://")) {
                return Err(err(
                    key,
                    &regex::escape(m),
                    format!("mirror `{m}` must be an http:// or https:// URL"),
                ));
            }
        }
        if let Some(k) = &b.keyring {
            if !k.starts_with('/') {
                return Err(err(
                    "bootstrap.keyring",
                    "keyring:",
                    format!("keyring `{k}` must be an absolute path"),
                ));
            }
        }
        if let Some(v) = &b.variant {
            if !["minbase", "apt", "required", "important", "standard"].contains(&v.as_str()) {
                return Err(err(
                    "bootstrap.variant",
                    "variant:",
                    format!("unknown variant `{v}`"),
                ));
            }
        }
        if let Some(s) = &b.suites {
            if s.is_empty() {
                return Err(err(
                    "bootstrap.suites",
                    "suites:",
                    "at least one suite is needed".into(),
                ));
            }
        }
    }
    // Role inputs come from the profile's own directory; a file elsewhere
    // on the host is given with --role-input, by the person building.
    for (name, file) in f.role_inputs.iter().flatten() {
        let inside = file.is_relative()
            && file
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside {
            return Err(err(
                &format!("role_inputs.{name}"),
                &format!(r#"^\s*"?{}"?\s*:"#, regex::escape(name)),
                format!(
                    "`{}` is not a path inside the profile's directory (relative, without \
                     `..`); name a file elsewhere with --role-input {name}=FILE",
                    file.display()
                ),
            ));
        }
    }
    if let Some(pkgs) = &f.packages {
        let re = regex::Regex::new(r"^[a-z0-9][a-z0-9+.-]+$").expect("static regex");
        let mut seen = BTreeSet::new();
        for p in pkgs {
            if !re.is_match(p) {
                return Err(err(
                    "packages",
                    &regex::escape(p),
                    format!("`{p}` is not a valid package name"),
                ));
            }
            if !seen.insert(p) {
                return Err(err(
                    "packages",
                    &regex::escape(p),
                    format!("package `{p}` is listed twice"),
                ));
            }
        }
    }
    if let Some(d) = &f.disk {
        if let Some(s) = &d.size {
            let size = parse_size(&s.as_text()).and_then(at_most_max);
            size.map_err(|m| err("disk.size", r"^\s*size:", m))?;
        }
        for (i, p) in d.partitions.iter().flatten().enumerate() {
            let key = format!("disk.partitions[{i}]");
            let at = format!(r"mount:\s*{}\s*(,|\}}|$)", regex::escape(&p.mount));
            check_mount_path(&p.mount).map_err(|m| err(&format!("{key}.mount"), &at, m))?;
            let size = parse_size(&p.size.as_text())
                .and_then(at_most_max)
                .map_err(|m| err(&format!("{key}.size"), &at, m))?;
            let min: u64 = match p.fs {
                FsType::Vfat => 64 << 20,
                FsType::Ext4 => 16 << 20,
            };
            if size < min {
                return Err(err(
                    &format!("{key}.size"),
                    &at,
                    format!(
                        "{} partition {} is {}; it needs at least {}",
                        p.fs.as_str(),
                        p.mount,
                        crate::config::format_size(size),
                        crate::config::format_size(min)
                    ),
                ));
            }
            check_options(&p.options).map_err(|m| err(&format!("{key}.options"), &at, m))?;
            if let Some(label) = &p.label {
                if label.is_empty()
                    || label.len() > 11
                    || !label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(err(
                        &format!("{key}.label"),
                        &at,
                        format!("label `{label}` must be 1-11 characters of A-Z, a-z, 0-9, - or _"),
                    ));
                }
            }
        }
        for (i, m) in d.mounts.iter().flatten().enumerate() {
            let key = format!("disk.mounts[{i}]");
            let at = format!(r"mount:\s*{}\s*(,|\}}|$)", regex::escape(&m.mount));
            check_mount_path(&m.mount).map_err(|e| err(&format!("{key}.mount"), &at, e))?;
            check_options(&m.options).map_err(|e| err(&format!("{key}.options"), &at, e))?;
            match (&m.fs, &m.bind) {
                (Some(fs), None) if fs == "tmpfs" => {}
                (None, Some(src)) => {
                    check_mount_path(src).map_err(|e| err(&format!("{key}.bind"), &at, e))?
                }
                _ => {
                    return Err(err(
                        &key,
                        &at,
                        "give either `fs: tmpfs` or `bind: /source`".into(),
                    ));
                }
            }
        }
    }
    if let Some(b) = &f.boot {
        for arg in b.cmdline.iter().flatten() {
            if arg.is_empty() || arg.contains(char::is_whitespace) {
                return Err(err(
                    "boot.cmdline",
                    "cmdline:",
                    format!("kernel argument {arg:?} must be one word"),
                ));
            }
        }
    }
    Ok(())
}

/// A size no larger than [`MAX_DISK_SIZE`].
fn at_most_max(size: u64) -> Result<u64, String> {
    if size > MAX_DISK_SIZE {
        return Err(format!(
            "{} is too large (at most {}: the largest image file ext4 holds and the \
             largest volume the clouds take)",
            crate::config::format_size(size),
            crate::config::format_size(MAX_DISK_SIZE)
        ));
    }
    Ok(size)
}

fn check_mount_path(m: &str) -> Result<(), String> {
    let ok = m.starts_with('/')
        && (m == "/" || !m.ends_with('/'))
        && !m.contains("//")
        && !m.split('/').any(|c| c == "." || c == "..")
        && !m.contains(char::is_whitespace);
    if ok {
        Ok(())
    } else {
        Err(format!("`{m}` is not an absolute, normalized mount path"))
    }
}

/// Mount options stemforge knows; a typo such as `nosiud` is an error.
const KNOWN_OPTIONS: &[&str] = &[
    "defaults",
    "ro",
    "rw",
    "nodev",
    "nosuid",
    "noexec",
    "dev",
    "suid",
    "exec",
    "noatime",
    "relatime",
    "nodiratime",
    "strictatime",
    "lazytime",
    "discard",
    "nofail",
    "noauto",
    "sync",
    "async",
    "bind",
    "rbind",
    "x-systemd.growfs",
];
const KNOWN_VALUE_OPTIONS: &[&str] = &[
    "errors",
    "umask",
    "fmask",
    "dmask",
    "mode",
    "size",
    "nr_inodes",
    "commit",
    "shortname",
    "uid",
    "gid",
    "x-systemd.device-timeout",
];

fn check_options(opts: &[String]) -> Result<(), String> {
    for o in opts {
        let ok = match o.split_once('=') {
            Some((k, v)) => KNOWN_VALUE_OPTIONS.contains(&k) && !v.is_empty(),
            None => KNOWN_OPTIONS.contains(&o.as_str()),
        };
        if !ok {
            return Err(format!("unknown mount option `{o}`"));
        }
    }
    Ok(())
}

/// Merge the chain (child first) into one profile and check the whole.
fn merge(chain: Vec<Loaded>) -> Result<Profile, ConfigError> {
    let child = &chain[0];
    let sources: Vec<PathBuf> = chain.iter().map(|l| l.path.clone()).collect();
    // The value of a key: the nearest file (child first) that sets it.
    macro_rules! pick {
        ($($field:tt)+) => {
            chain.iter().find_map(|l| l.file.$($field)+.clone())
        };
    }
    macro_rules! pick_b {
        ($field:ident) => {
            chain
                .iter()
                .find_map(|l| l.file.bootstrap.as_ref().and_then(|b| b.$field.clone()))
        };
    }
    let missing = |key: &str| ConfigError {
        file: child.path.clone(),
        line: None,
        column: None,
        key: Some(key.to_string()),
        message: "missing key (set it here or in the profile this one extends)".to_string(),
    };
    let name = pick!(name).ok_or_else(|| missing("name"))?;
    let os: OsInfo = pick!(os).ok_or_else(|| missing("os"))?;
    let suites = pick_b!(suites).ok_or_else(|| missing("bootstrap.suites"))?;
    let bootstrap = Bootstrap {
        mirror: pick_b!(mirror).ok_or_else(|| missing("bootstrap.mirror"))?,
        suites,
        suite_mirrors: pick_b!(suite_mirrors).unwrap_or_default(),
        components: pick_b!(components).unwrap_or_else(|| vec!["main".into()]),
        keyring: pick_b!(keyring).ok_or_else(|| missing("bootstrap.keyring"))?,
        variant: pick_b!(variant).unwrap_or_else(|| "minbase".into()),
        dpkg_path_exclude: pick_b!(dpkg_path_exclude).unwrap_or_default(),
        dpkg_path_include: pick_b!(dpkg_path_include).unwrap_or_default(),
    };
    // The first suite is the release itself.
    if bootstrap.suites[0] != os.codename {
        let l = bootstrap_owner(&chain, |b| b.suites.is_some());
        return Err(ConfigError::at(
            &l.path,
            &l.text,
            "bootstrap.suites",
            "suites:",
            format!(
                "the first suite must be the release `{}`, not `{}`",
                os.codename, bootstrap.suites[0]
            ),
        ));
    }
    for s in bootstrap.suite_mirrors.keys() {
        if !bootstrap.suites.contains(s) {
            let l = bootstrap_owner(&chain, |b| b.suite_mirrors.is_some());
            return Err(ConfigError::at(
                &l.path,
                &l.text,
                "bootstrap.suite_mirrors",
                &regex::escape(s),
                format!("suite `{s}` has a mirror but is not in bootstrap.suites"),
            ));
        }
    }
    let kernel = pick!(kernel).ok_or_else(|| missing("kernel"))?;
    let packages = pick!(packages).unwrap_or_default();

    // Disk: the nearest file that sets partitions owns the layout checks.
    let disk_file = chain
        .iter()
        .find(|l| l.file.disk.as_ref().is_some_and(|d| d.partitions.is_some()))
        .ok_or_else(|| missing("disk.partitions"))?;
    let disk = build_disk(&chain, disk_file)?;

    let boot = Boot {
        cmdline: chain
            .iter()
            .find_map(|l| l.file.boot.as_ref().and_then(|b| b.cmdline.clone()))
            .unwrap_or_default(),
        timeout: chain
            .iter()
            .find_map(|l| l.file.boot.as_ref().and_then(|b| b.timeout))
            .unwrap_or(1),
        bios: boot_flag(&chain, |b| b.bios),
        secure_boot: boot_flag(&chain, |b| b.secure_boot),
    };
    type Flag = fn(&BootFile) -> Option<bool>;
    let flags: [(bool, &str, &[&str], Flag); 2] = [
        (boot.bios, "bios", BIOS_PACKAGES, |b| b.bios),
        (boot.secure_boot, "secure_boot", SECURE_BOOT_PACKAGES, |b| {
            b.secure_boot
        }),
    ];
    for (on, key, needs, get) in flags {
        let absent: Vec<&str> = needs
            .iter()
            .copied()
            .filter(|n| on && !packages.iter().any(|p| p == n))
            .collect();
        if !absent.is_empty() {
            let l = chain
                .iter()
                .find(|l| l.file.boot.as_ref().and_then(get).is_some())
                .unwrap_or(&chain[0]);
            return Err(ConfigError::at(
                &l.path,
                &l.text,
                format!("boot.{key}"),
                &format!(r"^\s*{key}:"),
                format!("boot.{key} needs {} in packages", absent.join(" and ")),
            ));
        }
    }
    let roles = pick!(roles).unwrap_or_default();
    // Each input from the nearest profile that names it.
    let mut role_inputs = BTreeMap::new();
    for l in chain.iter().rev() {
        for (name, file) in l.file.role_inputs.iter().flatten() {
            let dir = l.path.parent().unwrap_or(Path::new("."));
            role_inputs.insert(name.clone(), (dir.join(file), l.path.clone()));
        }
    }
    let description = pick!(description).unwrap_or_default();
    let formats = match chain.iter().find(|l| l.file.formats.is_some()) {
        Some(l) => {
            let words = l.file.formats.clone().unwrap_or_default();
            crate::formats::Format::parse_list(&words, "formats")
                .map_err(|e| ConfigError::at(&l.path, &l.text, "formats", "^formats:", e.message))?
        }
        None => DEFAULT_FORMATS.to_vec(),
    };
    Ok(Profile {
        formats,
        name,
        description,
        sources,
        os,
        bootstrap,
        kernel,
        packages,
        disk,
        boot,
        roles,
        role_inputs,
    })
}

/// A boolean of the boot section: the nearest file that sets it, else off.
fn boot_flag(chain: &[Loaded], get: impl Fn(&BootFile) -> Option<bool>) -> bool {
    chain
        .iter()
        .find_map(|l| l.file.boot.as_ref().and_then(&get))
        .unwrap_or(false)
}

/// The nearest file of the chain whose bootstrap section sets a key.
fn bootstrap_owner(chain: &[Loaded], sets: impl Fn(&BootstrapFile) -> bool) -> &Loaded {
    chain
        .iter()
        .find(|l| l.file.bootstrap.as_ref().is_some_and(&sets))
        .unwrap_or(&chain[0])
}

fn build_disk(chain: &[Loaded], owner: &Loaded) -> Result<Disk, ConfigError> {
    let d = owner.file.disk.as_ref().expect("owner has disk");
    let at = |key: &str, needle: &str, msg: String| {
        ConfigError::at(&owner.path, &owner.text, key, needle, msg)
    };
    let mut partitions = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, p) in d.partitions.iter().flatten().enumerate() {
        let needle = format!(r"mount:\s*{}\s*(,|\}}|$)", regex::escape(&p.mount));
        if !seen.insert(p.mount.clone()) {
            let first = locate(&owner.text, &needle, 1).unwrap_or(1);
            let line = locate(&owner.text, &needle, first + 1);
            return Err(ConfigError::new(
                &owner.path,
                format!("mount point {} appears twice", p.mount),
            )
            .with_line(line)
            .with_key(format!("disk.partitions[{i}].mount")));
        }
        let size = parse_size(&p.size.as_text()).expect("checked per file");
        let label = p.label.clone().unwrap_or_else(|| default_label(&p.mount));
        partitions.push(Partition {
            mount: p.mount.clone(),
            fs: p.fs,
            size,
            options: p.options.clone(),
            label,
        });
    }
    let roots = partitions.iter().filter(|p| p.mount == "/").count();
    if roots != 1 {
        return Err(at(
            "disk.partitions",
            "partitions:",
            format!("exactly one partition must be mounted at / (found {roots})"),
        ));
    }
    let root = partitions
        .iter()
        .find(|p| p.mount == "/")
        .expect("one root");
    if root.fs != FsType::Ext4 {
        return Err(at(
            "disk.partitions",
            r"mount:\s*/\s*[,}]",
            "the / partition must be ext4".into(),
        ));
    }
    let esps: Vec<&Partition> = partitions.iter().filter(|p| p.fs == FsType::Vfat).collect();
    if esps.len() != 1 || esps[0].mount != "/boot/efi" {
        return Err(at(
            "disk.partitions",
            "partitions:",
            "UEFI boot needs exactly one vfat partition, mounted at /boot/efi".into(),
        ));
    }
    let mut labels = BTreeSet::new();
    for p in &partitions {
        if !labels.insert(p.label.clone()) {
            return Err(at(
                "disk.partitions",
                &regex::escape(&p.label),
                format!("label `{}` is used twice", p.label),
            ));
        }
    }
    // Sizes come from the file: a sum past u64 is an error, not a wrap.
    let bios = if boot_flag(chain, |b| b.bios) {
        BIOS_BOOT_SIZE
    } else {
        0
    };
    let needed = partitions.iter().try_fold(GPT_OVERHEAD + bios, |sum, p| {
        p.size
            .div_ceil(1 << 20)
            .checked_mul(1 << 20)
            .and_then(|s| sum.checked_add(s))
    });
    let Some(needed) = needed else {
        return Err(at(
            "disk.partitions",
            "partitions:",
            "the partitions' sizes add up to more than a disk can hold (16 EiB)".into(),
        ));
    };
    let size_text = chain.iter().find_map(|l| {
        l.file
            .disk
            .as_ref()
            .and_then(|d| d.size.clone())
            .map(|s| (l, s))
    });
    let size = match size_text {
        Some((l, s)) => {
            let size = parse_size(&s.as_text()).expect("checked per file");
            if size < needed {
                return Err(ConfigError::at(
                    &l.path,
                    &l.text,
                    "disk.size",
                    r"^\s*size:",
                    format!(
                        "disk size {} is smaller than its partitions need ({} including the GPT)",
                        crate::config::format_size(size),
                        crate::config::format_size(needed)
                    ),
                ));
            }
            size
        }
        None => needed,
    };
    let mut mounts = Vec::new();
    let mounts_file = chain.iter().find_map(|l| {
        l.file
            .disk
            .as_ref()
            .and_then(|d| d.mounts.clone())
            .map(|m| (l, m))
    });
    if let Some((l, ms)) = mounts_file {
        for (i, m) in ms.iter().enumerate() {
            if !seen.insert(m.mount.clone()) {
                return Err(ConfigError::at(
                    &l.path,
                    &l.text,
                    format!("disk.mounts[{i}].mount"),
                    &format!(r"mount:\s*{}\s*(,|\}}|$)", regex::escape(&m.mount)),
                    format!("mount point {} is already a partition", m.mount),
                ));
            }
            let kind = match &m.bind {
                Some(src) => ExtraMountKind::Bind {
                    source: src.clone(),
                },
                None => ExtraMountKind::Tmpfs,
            };
            mounts.push(ExtraMount {
                mount: m.mount.clone(),
                kind,
                options: m.options.clone(),
            });
        }
    }
    Ok(Disk {
        size,
        partitions,
        mounts,
    })
}

/// `root`, `var-log-audit`, `esp` ... from a mount path.
fn default_label(mount: &str) -> String {
    match mount {
        "/" => "root".into(),
        "/boot/efi" => "ESP".into(),
        m => {
            let l: String = m.trim_start_matches('/').replace('/', "-");
            l.chars().take(11).collect()
        }
    }
}

impl Profile {
    /// The full package set the bootstrap installs: kernel, profile
    /// packages and what the given stages install, sorted, unique.
    pub fn package_set<'a>(
        &self,
        stage_packages: impl IntoIterator<Item = &'a String>,
    ) -> Vec<String> {
        let mut set: BTreeSet<String> = self.packages.iter().cloned().collect();
        set.insert(self.kernel.clone());
        set.extend(stage_packages.into_iter().cloned());
        set.into_iter().collect()
    }

    /// The partition mounted at `/`.
    pub fn root_partition(&self) -> &Partition {
        self.disk
            .partitions
            .iter()
            .find(|p| p.mount == "/")
            .expect("validated: one root")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const GOOD: &str = r#"
name: test-os
os: { distro: debian, codename: bookworm, version: "12" }
bootstrap:
  mirror: http://deb.debian.org/debian
  suites: [bookworm, bookworm-updates, bookworm-security]
  suite_mirrors: { bookworm-security: http://deb.debian.org/debian-security }
  components: [main]
  keyring: /usr/share/keyrings/debian-archive-keyring.gpg
kernel: linux-image-amd64
packages: [systemd-sysv, openssh-server]
disk:
  size: 3GiB
  partitions:
    - { mount: /boot/efi, fs: vfat, size: 128MiB }
    - { mount: /, fs: ext4, size: 2GiB }
    - { mount: /tmp, fs: ext4, size: 256MiB, options: [nodev, nosuid, noexec] }
  mounts:
    - { mount: /dev/shm, fs: tmpfs, options: [nodev, nosuid, noexec] }
    - { mount: /var/tmp, bind: /tmp, options: [nodev, nosuid, noexec] }
"#;

    #[test]
    fn every_shipped_profile_loads_and_validates() {
        let names = ProfileSource::Embedded.names().unwrap();
        for expected in ["debian-bookworm", "ubuntu-jammy", "ubuntu-noble"] {
            assert!(names.contains(&expected.to_string()), "{names:?}");
        }
        for n in names {
            let p = load(&n, &ProfileSource::Embedded).unwrap_or_else(|e| panic!("{n}: {e}"));
            assert_eq!(p.name, n);
            assert!(p.disk.size >= p.disk.partitions.iter().map(|x| x.size).sum::<u64>());
            assert_eq!(p.bootstrap.suites[0], p.os.codename);
        }
    }

    #[test]
    fn ubuntu_profiles_point_at_the_ubuntu_archive() {
        for (n, codename, version) in [
            ("ubuntu-noble", "noble", "24.04"),
            ("ubuntu-jammy", "jammy", "22.04"),
        ] {
            let p = load(n, &ProfileSource::Embedded).unwrap();
            assert_eq!(p.os.distro, "ubuntu");
            assert_eq!(p.os.codename, codename);
            assert_eq!(p.os.version, version);
            assert!(
                p.bootstrap.mirror.contains("ubuntu"),
                "{}",
                p.bootstrap.mirror
            );
            assert_eq!(
                p.bootstrap.suites,
                vec![
                    codename.to_string(),
                    format!("{codename}-updates"),
                    format!("{codename}-security")
                ]
            );
            assert!(p.bootstrap.components.contains(&"main".to_string()));
            assert!(p.bootstrap.components.contains(&"universe".to_string()));
            assert_eq!(
                p.bootstrap.keyring,
                "/usr/share/keyrings/ubuntu-archive-keyring.gpg"
            );
            assert_eq!(p.kernel, "linux-image-virtual");
        }
        // jammy's systemd still carries resolved; noble splits it out.
        let jammy = load("ubuntu-jammy", &ProfileSource::Embedded).unwrap();
        assert!(!jammy.packages.contains(&"systemd-resolved".to_string()));
        let noble = load("ubuntu-noble", &ProfileSource::Embedded).unwrap();
        assert!(noble.packages.contains(&"systemd-resolved".to_string()));
    }

    #[test]
    fn good_profile_loads_with_mirrors_and_mounts() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "t.yml", GOOD);
        let prof = load(p.to_str().unwrap(), &ProfileSource::Embedded).unwrap();
        assert_eq!(prof.disk.size, 3 << 30);
        assert_eq!(
            prof.bootstrap.mirror_for("bookworm-security"),
            "http://deb.debian.org/debian-security"
        );
        assert_eq!(
            prof.bootstrap.mirror_for("bookworm"),
            "http://deb.debian.org/debian"
        );
        assert_eq!(prof.disk.partitions[2].label, "tmp");
        assert_eq!(
            prof.disk.mounts[1].kind,
            ExtraMountKind::Bind {
                source: "/tmp".into()
            }
        );
        assert_eq!(prof.root_partition().label, "root");
    }

    fn err_of(text: &str) -> ConfigError {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "bad.yml", text);
        load(p.to_str().unwrap(), &ProfileSource::Embedded).unwrap_err()
    }

    #[test]
    fn unknown_key_is_located() {
        let e = err_of(&GOOD.replace("kernel:", "kernal:"));
        assert_eq!(e.key.as_deref(), Some("kernal"));
        assert_eq!(e.line, Some(10));
    }

    #[test]
    fn bad_size_is_located() {
        let e = err_of(&GOOD.replace("size: 256MiB", "size: 256XB"));
        assert_eq!(e.key.as_deref(), Some("disk.partitions[2].size"));
        assert_eq!(e.line, Some(17), "{e}");
        assert!(e.message.contains("256XB"));
    }

    #[test]
    fn typo_in_mount_option_is_caught() {
        let e = err_of(&GOOD.replace(
            "nodev, nosuid, noexec] }\n  mounts",
            "nodev, nosiud, noexec] }\n  mounts",
        ));
        assert!(e.message.contains("nosiud"), "{e}");
        assert_eq!(e.line, Some(17));
    }

    #[test]
    fn layout_errors() {
        let e = err_of(&GOOD.replace("mount: /tmp,", "mount: /,"));
        assert!(e.message.contains("appears twice"), "{e}");
        assert_eq!(e.line, Some(17));
        let e = err_of(&GOOD.replace("size: 3GiB", "size: 2GiB"));
        assert!(e.message.contains("smaller than its partitions"), "{e}");
        let e = err_of(&GOOD.replace("fs: vfat, size: 128MiB", "fs: vfat, size: 32MiB"));
        assert!(e.message.contains("at least 64MiB"), "{e}");
        let e = err_of(&GOOD.replace("suites: [bookworm,", "suites: [trixie,"));
        assert!(e.message.contains("first suite"), "{e}");
        let e = err_of(&GOOD.replace("fs: tmpfs", "fs: ramfs"));
        assert!(e.message.contains("tmpfs"), "{e}");
    }

    #[test]
    fn boot_options_need_their_packages_and_say_where() {
        let hybrid = format!("{GOOD}boot:\n  timeout: 2\n  bios: true\n  secure_boot: true\n");
        let e = err_of(&hybrid);
        assert_eq!(e.key.as_deref(), Some("boot.bios"), "{e}");
        assert_eq!(e.line, Some(23), "{e}");
        assert!(e.message.contains("grub-pc-bin"), "{e}");
        let with_pc = hybrid.replace(
            "packages: [systemd-sysv, openssh-server]",
            "packages: [systemd-sysv, openssh-server, grub-pc-bin, shim-signed]",
        );
        let e = err_of(&with_pc);
        assert_eq!(e.key.as_deref(), Some("boot.secure_boot"), "{e}");
        assert_eq!(e.line, Some(24), "{e}");
        assert!(
            e.message.contains("grub-efi-amd64-signed") && !e.message.contains("shim-signed"),
            "{e}"
        );
        let d = tempfile::tempdir().unwrap();
        let all = with_pc.replace("shim-signed]", "shim-signed, grub-efi-amd64-signed]");
        let p = write(d.path(), "t.yml", &all);
        let prof = load(p.to_str().unwrap(), &ProfileSource::Embedded).unwrap();
        assert!(prof.boot.bios && prof.boot.secure_boot);
        // Off unless a profile says so; the disk then needs no room for a
        // BIOS boot partition.
        let p = write(d.path(), "plain.yml", GOOD);
        let plain = load(p.to_str().unwrap(), &ProfileSource::Embedded).unwrap();
        assert!(!plain.boot.bios && !plain.boot.secure_boot);
    }

    #[test]
    fn a_hybrid_disk_needs_room_for_the_bios_boot_partition() {
        // GOOD's partitions fill 2432 MiB; with 2 MiB for the GPT and
        // 1 MiB for the BIOS boot partition, 2434 MiB is too small.
        let pkgs = "packages: [systemd-sysv, openssh-server, grub-pc-bin]";
        let tight = format!("{GOOD}boot: {{ bios: true }}\n")
            .replace("packages: [systemd-sysv, openssh-server]", pkgs)
            .replace("size: 3GiB", "size: 2434MiB");
        assert!(
            err_of(&tight)
                .message
                .contains("smaller than its partitions")
        );
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "t.yml", &tight.replace("2434MiB", "2435MiB"));
        load(p.to_str().unwrap(), &ProfileSource::Embedded).unwrap();
    }

    #[test]
    fn extends_overrides_and_reports_missing_parent() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "base.yml", GOOD);
        let child = write(
            d.path(),
            "child.yml",
            "extends: base\nname: child\npackages: [openssh-server]\nroles: []\n",
        );
        let p = load(child.to_str().unwrap(), &ProfileSource::Embedded).unwrap();
        assert_eq!(p.name, "child");
        assert_eq!(p.packages, vec!["openssh-server"]);
        assert_eq!(p.kernel, "linux-image-amd64");
        assert_eq!(p.sources.len(), 2);
        let orphan = write(d.path(), "orphan.yml", "extends: nowhere\nname: x\n");
        let e = load(orphan.to_str().unwrap(), &ProfileSource::Embedded).unwrap_err();
        assert!(e.message.contains("`nowhere` not found"), "{e}");
        assert_eq!(e.line, Some(1));
    }

    #[test]
    fn unknown_profile_lists_known_ones() {
        let e = load("no-such-os", &ProfileSource::Embedded).unwrap_err();
        assert!(e.message.contains("debian-bookworm"), "{e}");
    }
}
