//! Hardening stages: `stages/NN-name/stage.yml` (+ `files/`, optional
//! `apply.sh`). A stage says what it changes, declaratively where it can,
//! and which controls it satisfies; each control carries an independent
//! check written as the requirement. The catalog is the ordered set of
//! stages; it is compiled into the binary and can be replaced by a
//! directory (`--stages DIR`).

use crate::assets;
use crate::config::{ConfigError, locate, locate_all, parse_yaml};
use crate::scan::check::Check;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Stage {
    /// `50-sshd`
    pub dir_name: String,
    pub order: u32,
    pub name: String,
    pub summary: String,
    /// `stages/50-sshd/stage.yml`, for messages.
    pub source: PathBuf,
    pub when: When,
    pub packages: Packages,
    pub files: Vec<FileAction>,
    pub permissions: Vec<Permission>,
    pub sysctl: Vec<(String, String)>,
    pub services: Services,
    pub kernel_modules: KernelModules,
    /// Base controls this stage replaces on the images it applies to.
    pub supersedes: Vec<Supersede>,
    /// The chroot script (`apply.sh`): its name and text.
    pub script: Option<(String, String)>,
    pub controls: Vec<Control>,
    /// The contents of `files/`, by relative name.
    pub assets: BTreeMap<String, Vec<u8>>,
    /// SHA-256 over stage.yml and every file beside it: the stage's
    /// identity in build manifests.
    pub digest: String,
}

impl Stage {
    /// What a `files:` action writes: its file from `files/`, or its inline
    /// content.
    pub fn file_bytes(&self, f: &FileAction) -> Vec<u8> {
        match (&f.source, &f.content) {
            (Some(src), _) => self.assets.get(src).cloned().unwrap_or_default(),
            (None, Some(c)) => c.as_bytes().to_vec(),
            (None, None) => Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// Applies when the image has any of these roles (empty: always).
    #[serde(default)]
    pub roles: Vec<String>,
    /// Applies to these distros or codenames (empty: all).
    #[serde(default)]
    pub os: Vec<String>,
    /// Applies to these releases (`VERSION_ID`: `12`, `22.04`; empty: all).
    #[serde(default)]
    pub version: Vec<String>,
    /// Where it can be checked: offline on a tree or image, live on a
    /// running system, or both (the default).
    #[serde(default, skip_serializing_if = "TargetMode::is_any")]
    pub target: TargetMode,
    /// Paths the target must have for it to apply (`/usr/local/bin/kubelet`):
    /// a role's optional input that a build may leave out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
}

/// Offline, live or both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetMode {
    #[default]
    Any,
    /// A property of the shipped image (no SSH host keys, an empty
    /// machine-id): true of the file, not of a booted system.
    Offline,
    /// Only a running system can show it (listening sockets).
    Live,
}

impl TargetMode {
    fn is_any(&self) -> bool {
        *self == TargetMode::Any
    }
}

impl When {
    pub fn matches(&self, distro: &str, codename: &str, roles: &[String]) -> bool {
        let role_ok = self.roles.is_empty() || self.roles.iter().any(|r| roles.contains(r));
        let os_ok = self.os.is_empty() || self.os.iter().any(|o| o == distro || o == codename);
        role_ok && os_ok
    }

    /// Whether it applies to `ctx`, and why not when it does not.
    pub fn applies(&self, ctx: &crate::scan::ScanContext, live: bool) -> Result<(), String> {
        if !self.matches(&ctx.distro, &ctx.codename, &ctx.roles)
            || !(self.version.is_empty() || self.version.contains(&ctx.version))
        {
            return Err(format!(
                "applies to {}; this target is {} {} {} with roles [{}]",
                self.describe(),
                ctx.distro,
                ctx.codename,
                ctx.version,
                ctx.roles.join(", ")
            ));
        }
        match (self.target, live) {
            (TargetMode::Offline, true) => {
                Err("a property of the shipped image; checked offline".into())
            }
            (TargetMode::Live, false) => Err("only a running system shows it".into()),
            _ => Ok(()),
        }
    }

    /// Why a stage does not apply, for reports.
    pub fn describe(&self) -> String {
        let mut p = Vec::new();
        if !self.roles.is_empty() {
            p.push(format!("roles {}", self.roles.join("|")));
        }
        if !self.os.is_empty() {
            p.push(format!("os {}", self.os.join("|")));
        }
        if !self.version.is_empty() {
            p.push(format!("version {}", self.version.join("|")));
        }
        match self.target {
            TargetMode::Any => {}
            TargetMode::Offline => p.push("offline targets".into()),
            TargetMode::Live => p.push("live targets".into()),
        }
        if p.is_empty() {
            "always".into()
        } else {
            p.join(" and ")
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Packages {
    #[serde(default)]
    pub install: Vec<String>,
    /// More to install on one distro or codename (`bookworm:
    /// [postgresql-15-pgaudit]`): packages whose names carry a version.
    #[serde(default)]
    pub install_on: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub purge: Vec<String>,
}

impl Packages {
    /// What to install on this distro and codename.
    pub fn install_for(&self, distro: &str, codename: &str) -> Vec<String> {
        let mut all = self.install.clone();
        for (on, pkgs) in &self.install_on {
            if on == distro || on == codename {
                all.extend(pkgs.iter().cloned());
            }
        }
        all
    }
}

/// A base control a role stage replaces: it does not apply to images
/// with that stage, and says why.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Supersede {
    pub control: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Services {
    #[serde(default)]
    pub enable: Vec<String>,
    #[serde(default)]
    pub disable: Vec<String>,
    #[serde(default)]
    pub mask: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelModules {
    #[serde(default)]
    pub disable: Vec<String>,
}

/// A file the stage places in the tree.
#[derive(Debug, Clone, Serialize)]
pub struct FileAction {
    pub path: String,
    /// Name under `files/`, or `None` for inline content.
    pub source: Option<String>,
    pub content: Option<String>,
    pub mode: u32,
    pub owner: String,
    pub group: String,
}

/// A mode/owner change on paths the packages installed (`*` allowed; a
/// pattern that matches nothing is fine, a plain path must exist).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Permission {
    pub path: String,
    #[serde(default, deserialize_with = "mode_opt")]
    pub mode: Option<u32>,
    pub owner: Option<String>,
    pub group: Option<String>,
}

fn mode_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let s = String::deserialize(d)?;
    crate::scan::kinds::file::parse_mode(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    High,
    Medium,
    Low,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::High => "high",
            Severity::Medium => "medium",
            Severity::Low => "low",
        }
    }
}

/// Schema v1's `scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LegacyScope {
    Any,
    Image,
}

/// A control's references, as reports carry them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Refs {
    /// Stemcell hardening FAQ items (`4.8.14`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faq: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stig: Vec<crate::benchmarks::StigRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cis: Vec<crate::benchmarks::CisRef>,
}

impl Refs {
    /// The references as coverage keys (`faq:4.2.1`,
    /// `stig:UBTU-22-255040`, `cis:ubuntu2204-v2.0.0:5.2.10`).
    pub fn keys(&self) -> Vec<String> {
        self.faq
            .iter()
            .map(|f| format!("faq:{f}"))
            .chain(self.stig.iter().map(|s| format!("stig:{}", s.version)))
            .chain(
                self.cis
                    .iter()
                    .map(|c| format!("cis:{}:{}", c.benchmark, c.id)),
            )
            .collect()
    }
}

/// `refs:` as written: FAQ item numbers, STIG rule versions
/// (`UBTU-22-255040`) and CIS recommendations by benchmark
/// (`ubuntu2204-v2.0.0:5.2.10`); the loader expands them from the tables
/// in `benchmarks/` and refuses an id they do not hold.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefsFile {
    #[serde(default)]
    faq: Vec<String>,
    #[serde(default)]
    stig: Vec<String>,
    #[serde(default)]
    cis: Vec<String>,
}

impl RefsFile {
    fn resolve(self) -> Result<Refs, (&'static str, String)> {
        let b = crate::benchmarks::get();
        for id in &self.faq {
            if !b.faq(id) {
                return Err((
                    "refs.faq",
                    format!("`{id}` is no item of the FAQ's section 4"),
                ));
            }
        }
        let stig = self
            .stig
            .iter()
            .map(|v| {
                b.stig(v).cloned().ok_or((
                    "refs.stig",
                    format!(
                        "`{v}` is no rule of the Ubuntu 22.04 V2R8 or 24.04 V1R6 STIG \
                         (benchmarks/stig-*.tsv)"
                    ),
                ))
            })
            .collect::<Result<_, _>>()?;
        let cis = self
            .cis
            .iter()
            .map(|k| {
                b.cis(k).cloned().ok_or((
                    "refs.cis",
                    format!(
                        "`{k}` is no Server recommendation of benchmarks/cis-ubuntu.tsv \
                         (write BENCHMARK:ID, as in ubuntu2204-v2.0.0:5.2.10)"
                    ),
                ))
            })
            .collect::<Result<_, _>>()?;
        Ok(Refs {
            faq: self.faq,
            stig,
            cis,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Control {
    pub id: String,
    pub title: String,
    pub severity: Severity,
    /// The FAQ items, STIG rules and CIS recommendations it answers.
    pub refs: Refs,
    /// Why it matters.
    pub rationale: String,
    /// How an image comes to meet it (default: the stage that declares it).
    pub fix: String,
    /// Where it applies (with its stage's `when`).
    pub when: When,
    pub check: Check,
    /// How to break it: the mutations of a hardened tree that must make
    /// it fail (`stemforge prove`).
    pub breaks: Vec<crate::scan::breaks::Mutation>,
    /// The stage that declares it (`sshd`).
    pub stage: String,
}

impl Control {
    /// Whether the control applies to `ctx` (its stage's `when`, then its
    /// own), and why not when it does not.
    pub fn applies(
        &self,
        stage: &Stage,
        ctx: &crate::scan::ScanContext,
        live: bool,
    ) -> Result<(), String> {
        stage.when.applies(ctx, live)?;
        self.when.applies(ctx, live)
    }
}

// ---- the file format --------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageFile {
    name: String,
    summary: String,
    #[serde(default)]
    when: When,
    #[serde(default)]
    packages: Packages,
    #[serde(default)]
    files: Vec<FileActionFile>,
    #[serde(default)]
    permissions: Vec<Permission>,
    #[serde(default)]
    sysctl: serde_yaml::Mapping,
    #[serde(default)]
    services: Services,
    #[serde(default)]
    kernel_modules: KernelModules,
    #[serde(default)]
    supersedes: Vec<Supersede>,
    script: Option<String>,
    #[serde(default)]
    controls: Vec<ControlFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileActionFile {
    path: String,
    source: Option<String>,
    content: Option<String>,
    #[serde(default = "default_mode")]
    mode: String,
    #[serde(default = "root")]
    owner: String,
    #[serde(default = "root")]
    group: String,
}

fn default_mode() -> String {
    "0644".into()
}
fn root() -> String {
    "root".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlFile {
    id: String,
    title: String,
    severity: Severity,
    #[serde(default)]
    refs: RefsFile,
    /// `description` is the schema v1 name.
    #[serde(default, alias = "description")]
    rationale: String,
    #[serde(default)]
    fix: String,
    #[serde(default)]
    when: When,
    /// Schema v1: `scope: image` is `when: { target: offline }`.
    #[serde(default)]
    scope: Option<LegacyScope>,
    #[serde(deserialize_with = "crate::scan::check::deserialize_check")]
    check: Check,
    #[serde(
        default,
        rename = "break",
        deserialize_with = "crate::scan::breaks::deserialize"
    )]
    breaks: Vec<crate::scan::breaks::Mutation>,
}

/// Where the catalog comes from.
#[derive(Debug, Clone)]
pub enum StageSource {
    Embedded,
    Dir(PathBuf),
}

/// A stage directory's files: (relative path, bytes).
type DirFiles = Vec<(String, Vec<u8>)>;

impl StageSource {
    /// Stage directory names with their files.
    fn read(&self) -> Result<Vec<(String, DirFiles)>, ConfigError> {
        let mut out = Vec::new();
        match self {
            StageSource::Embedded => {
                for d in assets::STAGES.dirs() {
                    let name = d.path().to_string_lossy().into_owned();
                    let mut files = Vec::new();
                    collect_embedded(d, d.path(), &mut files);
                    out.push((name, files));
                }
            }
            StageSource::Dir(root) => {
                let rd = std::fs::read_dir(root).map_err(|e| {
                    ConfigError::new(root, format!("cannot read stage directory: {e}"))
                })?;
                for entry in rd.flatten() {
                    let p = entry.path();
                    if !p.is_dir() {
                        continue;
                    }
                    let name = entry.file_name().to_string_lossy().into_owned();
                    // Links among the stage files may point anywhere in the
                    // stages directory or in the stage's own.
                    let bounds: Vec<PathBuf> = [root, &p]
                        .iter()
                        .filter_map(|d| d.canonicalize().ok())
                        .collect();
                    let mut files = Vec::new();
                    collect_dir(&p, &p, &bounds, &mut files)?;
                    out.push((name, files));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The path a user would recognize for `dir/file`.
    fn display(&self, dir: &str, file: &str) -> PathBuf {
        match self {
            StageSource::Embedded => Path::new("stages").join(dir).join(file),
            StageSource::Dir(root) => root.join(dir).join(file),
        }
    }
}

fn collect_embedded(d: &include_dir::Dir<'static>, base: &Path, out: &mut DirFiles) {
    for f in d.files() {
        let rel = f.path().strip_prefix(base).unwrap_or(f.path());
        out.push((rel.to_string_lossy().into_owned(), f.contents().to_vec()));
    }
    for sub in d.dirs() {
        collect_embedded(sub, base, out);
    }
}

/// Every file under a stage directory, by its path relative to `base`.
/// A symlink is followed only to a regular file inside `bounds` (the
/// stages directory): a stage cannot carry a host file into the image
/// through a link, and a linked directory, which may loop, is refused.
/// Anything else that is not a regular file is an error naming it, never
/// opened (reading a FIFO would block for ever).
fn collect_dir(
    dir: &Path,
    base: &Path,
    bounds: &[PathBuf],
    out: &mut DirFiles,
) -> Result<(), ConfigError> {
    let cannot = |p: &Path, e: std::io::Error| ConfigError::new(p, format!("cannot read: {e}"));
    for entry in std::fs::read_dir(dir).map_err(|e| cannot(dir, e))? {
        let p = entry.map_err(|e| cannot(dir, e))?.path();
        let ft = std::fs::symlink_metadata(&p)
            .map_err(|e| cannot(&p, e))?
            .file_type();
        if ft.is_dir() {
            collect_dir(&p, base, bounds, out)?;
            continue;
        }
        if ft.is_symlink() {
            let target = p.canonicalize().map_err(|e| cannot(&p, e))?;
            if !bounds.iter().any(|b| target.starts_with(b)) {
                return Err(ConfigError::new(
                    &p,
                    format!(
                        "a symlink to {}, outside the stages directory: not followed",
                        target.display()
                    ),
                ));
            }
            if !target.is_file() {
                return Err(ConfigError::new(
                    &p,
                    "a symlink to a directory or a special file: not followed \
                     (stage files are regular files)",
                ));
            }
        } else if !ft.is_file() {
            return Err(ConfigError::new(
                &p,
                "not a regular file (a FIFO, socket or device): not read",
            ));
        }
        let rel = p
            .strip_prefix(base)
            .unwrap_or(&p)
            .to_string_lossy()
            .into_owned();
        out.push((rel, std::fs::read(&p).map_err(|e| cannot(&p, e))?));
    }
    Ok(())
}

/// An absolute path with no `.`, `..` or empty (`//`) component: what a
/// stage writes or changes is where its path says.
pub(crate) fn is_normalized_abs(path: &str) -> bool {
    path.strip_prefix('/').is_some_and(|rest| {
        rest.split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
    })
}

/// The ordered set of stages.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub stages: Vec<Stage>,
}

impl Catalog {
    pub fn load(source: &StageSource) -> Result<Catalog, ConfigError> {
        let dir_re = regex::Regex::new(r"^(\d{2})-([a-z0-9][a-z0-9-]*)$").expect("static regex");
        let mut stages: Vec<Stage> = Vec::new();
        let mut texts: BTreeMap<String, String> = BTreeMap::new();
        for (dir, files) in source.read()? {
            let Some(caps) = dir_re.captures(&dir) else {
                return Err(ConfigError::new(
                    source.display(&dir, ""),
                    "stage directories are named NN-name (two digits, a dash, lowercase name)",
                ));
            };
            let order: u32 = caps[1].parse().expect("two digits");
            let dir_stage_name = caps[2].to_string();
            let yml = source.display(&dir, "stage.yml");
            let text = files
                .iter()
                .find(|(n, _)| n == "stage.yml")
                .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
                .ok_or_else(|| ConfigError::new(&yml, "missing stage.yml"))?;
            let file: StageFile = parse_yaml(&yml, &text)?;
            if file.name != dir_stage_name {
                return Err(ConfigError::at(
                    &yml,
                    &text,
                    "name",
                    r"^name:",
                    format!(
                        "name `{}` must match the directory name `{dir_stage_name}`",
                        file.name
                    ),
                ));
            }
            if let Some(prev) = stages.iter().find(|s| s.order == order) {
                return Err(ConfigError::new(
                    &yml,
                    format!(
                        "stage number {order:02} is already used by {}",
                        prev.dir_name
                    ),
                ));
            }
            let assets: BTreeMap<String, Vec<u8>> = files
                .iter()
                .filter_map(|(n, b)| n.strip_prefix("files/").map(|r| (r.to_string(), b.clone())))
                .collect();
            let stage = build_stage(&dir, order, file, &yml, &text, &files, assets)?;
            texts.insert(dir.clone(), text);
            stages.push(stage);
        }
        // Control ids are unique across the catalog.
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        for s in &stages {
            for c in &s.controls {
                if let Some(first) = seen.insert(c.id.clone(), s.dir_name.clone()) {
                    let text = &texts[&s.dir_name];
                    let needle = format!(r"^\s*-?\s*id:\s*{}\s*$", regex::escape(&c.id));
                    let lines = locate_all(text, &needle);
                    let line = if first == s.dir_name {
                        lines.get(1)
                    } else {
                        lines.first()
                    };
                    return Err(ConfigError::new(
                        source.display(&s.dir_name, "stage.yml"),
                        format!("control id `{}` is already used in stages/{first}", c.id),
                    )
                    .with_line(line.copied())
                    .with_key("controls.id"));
                }
            }
        }
        // A stage supersedes controls that exist, and only for a role.
        for s in &stages {
            for sup in &s.supersedes {
                let text = &texts[&s.dir_name];
                let at = |msg: String| {
                    ConfigError::at(
                        source.display(&s.dir_name, "stage.yml"),
                        text,
                        "supersedes.control",
                        &format!(r"control:\s*{}", regex::escape(&sup.control)),
                        msg,
                    )
                };
                if !seen.contains_key(&sup.control) {
                    return Err(at(format!("no control `{}` in the catalog", sup.control)));
                }
                if s.when.roles.is_empty() {
                    return Err(at(
                        "only a role's stage (`when: { roles: [...] }`) may supersede a control"
                            .into(),
                    ));
                }
            }
        }
        Ok(Catalog { stages })
    }

    /// Whether `control` of `stage` applies to `ctx`: its stage's and its
    /// own `when`, and no role stage of the target supersedes it.
    pub fn control_applies(
        &self,
        stage: &Stage,
        control: &Control,
        ctx: &crate::scan::ScanContext,
        target: &crate::scan::target::Target,
    ) -> Result<(), String> {
        control.applies(stage, ctx, target.is_live())?;
        if let Some(p) = stage
            .when
            .needs
            .iter()
            .chain(&control.when.needs)
            .find(|p| !target.exists(p))
        {
            return Err(format!("needs {p}, which this target does not have"));
        }
        let active = self.applicable(&ctx.distro, &ctx.codename, &ctx.roles);
        match self.superseded(&control.id, &active) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// Why `control` does not apply to an image with these stages: the
    /// role stage that supersedes it and its reason.
    pub fn superseded(&self, control: &str, applied: &[&Stage]) -> Option<String> {
        applied.iter().find_map(|s| {
            s.supersedes
                .iter()
                .find(|x| x.control == control)
                .map(|x| format!("superseded by stages/{}: {}", s.dir_name, x.reason))
        })
    }

    /// All controls with their stage, in stage order.
    pub fn controls(&self) -> impl Iterator<Item = (&Stage, &Control)> {
        self.stages
            .iter()
            .flat_map(|s| s.controls.iter().map(move |c| (s, c)))
    }

    /// The roles some stage is written for.
    pub fn known_roles(&self) -> BTreeSet<String> {
        self.stages
            .iter()
            .flat_map(|s| s.when.roles.iter().cloned())
            .collect()
    }

    /// The stages that apply to an image of this distro, codename and roles.
    pub fn applicable(&self, distro: &str, codename: &str, roles: &[String]) -> Vec<&Stage> {
        self.stages
            .iter()
            .filter(|s| s.when.matches(distro, codename, roles))
            .collect()
    }
}

fn build_stage(
    dir: &str,
    order: u32,
    file: StageFile,
    yml: &Path,
    text: &str,
    files: &[(String, Vec<u8>)],
    assets: BTreeMap<String, Vec<u8>>,
) -> Result<Stage, ConfigError> {
    let err = |key: &str, needle: &str, msg: String| ConfigError::at(yml, text, key, needle, msg);
    // The stage's directory as the user knows it, for messages.
    let stage_dir = yml.parent().unwrap_or(Path::new(dir));
    let pkg_re = regex::Regex::new(r"^[a-z0-9][a-z0-9+.-]+$").expect("static regex");
    for p in file
        .packages
        .install
        .iter()
        .chain(file.packages.install_on.values().flatten())
        .chain(&file.packages.purge)
    {
        if !pkg_re.is_match(p) {
            return Err(err(
                "packages",
                &regex::escape(p),
                format!("`{p}` is not a valid package name"),
            ));
        }
    }
    let mut actions = Vec::new();
    for (i, f) in file.files.iter().enumerate() {
        let key = format!("files[{i}]");
        let at = format!(r"path:\s*{}", regex::escape(&f.path));
        if !f.path.starts_with('/') || f.path.ends_with('/') {
            return Err(err(
                &format!("{key}.path"),
                &at,
                format!("`{}` must be an absolute file path", f.path),
            ));
        }
        if !is_normalized_abs(&f.path) {
            return Err(err(
                &format!("{key}.path"),
                &at,
                format!(
                    "`{}` must be a normalized absolute path (no `.`, `..` or `//`)",
                    f.path
                ),
            ));
        }
        match (&f.source, &f.content) {
            (Some(src), None) => {
                if !assets.contains_key(src) {
                    return Err(err(
                        &format!("{key}.source"),
                        &at,
                        format!(
                            "`{src}` not found under {}/",
                            stage_dir.join("files").display()
                        ),
                    ));
                }
            }
            (None, Some(_)) => {}
            _ => {
                return Err(err(
                    &key,
                    &at,
                    "give exactly one of `source` and `content`".into(),
                ));
            }
        }
        let mode = crate::scan::kinds::file::parse_mode(&f.mode)
            .map_err(|m| err(&format!("{key}.mode"), &at, m))?;
        actions.push(FileAction {
            path: f.path.clone(),
            source: f.source.clone(),
            content: f.content.clone(),
            mode,
            owner: f.owner.clone(),
            group: f.group.clone(),
        });
    }
    for (i, p) in file.permissions.iter().enumerate() {
        let at = format!(r"path:\s*{}", regex::escape(&p.path));
        if !p.path.starts_with('/') {
            return Err(err(
                &format!("permissions[{i}].path"),
                &at,
                format!("`{}` must be absolute", p.path),
            ));
        }
        if !is_normalized_abs(&p.path) {
            return Err(err(
                &format!("permissions[{i}].path"),
                &at,
                format!(
                    "`{}` must be a normalized absolute path (no `.`, `..` or `//`)",
                    p.path
                ),
            ));
        }
        if p.mode.is_none() && p.owner.is_none() && p.group.is_none() {
            return Err(err(
                &format!("permissions[{i}]"),
                &at,
                "give `mode`, `owner` or `group`".into(),
            ));
        }
    }
    let mut sysctl = Vec::new();
    for (k, v) in &file.sysctl {
        let key = k.as_str().unwrap_or_default().to_string();
        let value = match v {
            serde_yaml::Value::String(s) => s.clone(),
            serde_yaml::Value::Number(n) => n.to_string(),
            serde_yaml::Value::Bool(b) => b.to_string(),
            _ => {
                return Err(err(
                    "sysctl",
                    &regex::escape(&key),
                    format!("sysctl `{key}` needs a scalar value"),
                ));
            }
        };
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-*".contains(c))
        {
            return Err(err(
                "sysctl",
                "sysctl:",
                format!("`{key}` is not a sysctl key"),
            ));
        }
        sysctl.push((key, value));
    }
    let unit_re = regex::Regex::new(r"^[A-Za-z0-9:_.@-]+$").expect("static regex");
    for u in file
        .services
        .enable
        .iter()
        .chain(&file.services.disable)
        .chain(&file.services.mask)
    {
        if !unit_re.is_match(u) {
            return Err(err(
                "services",
                &regex::escape(u),
                format!("`{u}` is not a unit name"),
            ));
        }
    }
    for m in &file.kernel_modules.disable {
        if !m
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(err(
                "kernel_modules.disable",
                &regex::escape(m),
                format!("`{m}` is not a module name"),
            ));
        }
    }
    let script = match &file.script {
        Some(name) => {
            let body = files
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
                .ok_or_else(|| {
                    err(
                        "script",
                        r"^script:",
                        format!("`{name}` not found in {}/", stage_dir.display()),
                    )
                })?;
            Some((name.clone(), body))
        }
        None => None,
    };
    let id_re = regex::Regex::new(r"^[a-z0-9][a-z0-9-]*[a-z0-9]$").expect("static regex");
    let mut controls = Vec::new();
    let mut from = 1;
    for (i, c) in file.controls.into_iter().enumerate() {
        let needle = format!(r"id:\s*{}\s*$", regex::escape(&c.id));
        let line = locate(text, &needle, from);
        if let Some(l) = line {
            from = l + 1;
        }
        let cerr = |key: &str, msg: String| {
            ConfigError::new(yml, msg)
                .with_line(line)
                .with_key(format!("controls[{i}].{key}"))
        };
        if !id_re.is_match(&c.id) {
            return Err(cerr(
                "id",
                format!("`{}`: ids are lowercase words joined by dashes", c.id),
            ));
        }
        if c.title.trim().is_empty() {
            return Err(cerr("title", "a control needs a title".into()));
        }
        let refs = c.refs.resolve().map_err(|(key, msg)| {
            // Point at the control's own `refs:` line.
            let at = line.and_then(|l| locate(text, r"^\s+refs:", l));
            ConfigError::new(yml, msg)
                .with_line(at.or(line))
                .with_key(format!("controls[{i}].{key}"))
        })?;
        c.check
            .validate()
            .map_err(|m| cerr("check", format!("{} check: {m}", c.check.kind())))?;
        for m in &c.breaks {
            m.validate().map_err(|msg| cerr("break", msg))?;
        }
        controls.push(Control {
            id: c.id,
            title: c.title,
            severity: c.severity,
            refs,
            rationale: c.rationale,
            fix: if c.fix.is_empty() {
                format!("applied by stage {dir}: {}", file.summary)
            } else {
                c.fix
            },
            when: match c.scope {
                Some(LegacyScope::Image) if c.when.target == TargetMode::Any => When {
                    target: TargetMode::Offline,
                    ..c.when
                },
                _ => c.when,
            },
            check: c.check,
            breaks: c.breaks,
            stage: file.name.clone(),
        });
    }
    let digest = {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(text.as_bytes());
        if let Some((name, body)) = &script {
            h.update(name.as_bytes());
            h.update(body.as_bytes());
        }
        for (name, bytes) in &assets {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        hex::encode(h.finalize())
    };
    Ok(Stage {
        digest,
        dir_name: dir.to_string(),
        order,
        name: file.name,
        summary: file.summary,
        source: yml.to_path_buf(),
        when: file.when,
        packages: file.packages,
        files: actions,
        permissions: file.permissions,
        sysctl,
        services: file.services,
        kernel_modules: file.kernel_modules,
        supersedes: file.supersedes,
        script,
        controls,
        assets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_stage(root: &Path, dir: &str, yml: &str) {
        let d = root.join(dir);
        std::fs::create_dir_all(d.join("files")).unwrap();
        std::fs::write(d.join("stage.yml"), yml).unwrap();
    }

    const OK: &str = "name: demo\nsummary: a demo\nfiles:\n  - { path: /etc/demo.conf, content: \"x\\n\", mode: \"0600\" }\ncontrols:\n  - id: demo-file\n    title: The demo file is private\n    severity: low\n    refs: { faq: [\"4.10.1\"] }\n    check: { file: { path: /etc/demo.conf, mode: \"0600\" } }\n";

    #[test]
    fn the_shipped_catalog_loads() {
        let c = Catalog::load(&StageSource::Embedded).unwrap();
        assert!(c.stages.len() >= 7, "{} stages", c.stages.len());
        let n = c.controls().count();
        assert!(n >= 40, "{n} controls");
        // Stage order is the directory order.
        let orders: Vec<u32> = c.stages.iter().map(|s| s.order).collect();
        let mut sorted = orders.clone();
        sorted.sort();
        assert_eq!(orders, sorted);
    }

    #[test]
    fn every_control_traces_to_a_reference_or_says_why() {
        let c = Catalog::load(&StageSource::Embedded).unwrap();
        for (_, ctl) in c.controls() {
            let r = &ctl.refs;
            assert!(
                !(r.faq.is_empty() && r.stig.is_empty() && r.cis.is_empty())
                    || ctl.when.target == TargetMode::Offline
                    || !ctl.rationale.is_empty(),
                "{}: no reference and no rationale saying where it comes from",
                ctl.id
            );
        }
    }

    #[test]
    fn every_shipped_control_has_a_break_recipe() {
        // `stemforge prove` applies them to a built tree (tests/e2e.rs).
        let c = Catalog::load(&StageSource::Embedded).unwrap();
        // A control only a running system can show (listening sockets)
        // cannot be broken in a tree: its kind's tests prove it instead.
        let missing: Vec<&str> = c
            .controls()
            .filter(|(_, ctl)| ctl.breaks.is_empty() && ctl.when.target != TargetMode::Live)
            .map(|(_, ctl)| ctl.id.as_str())
            .collect();
        assert!(missing.is_empty(), "no `break:` recipe: {missing:?}");
    }

    #[test]
    fn a_directory_catalog_loads() {
        let d = tempfile::tempdir().unwrap();
        write_stage(d.path(), "10-demo", OK);
        let c = Catalog::load(&StageSource::Dir(d.path().into())).unwrap();
        assert_eq!(c.stages[0].files[0].mode, 0o600);
        assert_eq!(c.stages[0].controls[0].stage, "demo");
    }

    fn load_err(dir: &str, yml: &str) -> ConfigError {
        let d = tempfile::tempdir().unwrap();
        write_stage(d.path(), dir, yml);
        Catalog::load(&StageSource::Dir(d.path().into())).unwrap_err()
    }

    #[test]
    fn unknown_key_and_unknown_kind_name_file_and_line() {
        let e = load_err(
            "10-demo",
            &OK.replace("severity: low", "severity: low\n    sevrity: low"),
        );
        assert_eq!(e.key.as_deref(), Some("controls[0].sevrity"));
        assert_eq!(e.line, Some(9));
        assert!(e.file.ends_with("10-demo/stage.yml"));
        let e = load_err("10-demo", &OK.replace("check: { file:", "check: { fiel:"));
        assert!(e.message.contains("unknown variant `fiel`"), "{e}");
        assert_eq!(e.line, Some(10));
    }

    #[test]
    fn duplicate_ids_are_located() {
        let dup = format!(
            "{OK}  - id: demo-file\n    title: again\n    severity: low\n    check: {{ file: {{ path: /x }} }}\n"
        );
        let e = load_err("10-demo", &dup);
        assert!(e.message.contains("already used"), "{e}");
        assert_eq!(e.line, Some(11));
    }

    #[test]
    fn semantic_errors() {
        let e = load_err(
            "10-demo",
            &OK.replace("mode: \"0600\" }\ncontrols", "mode: \"0800\" }\ncontrols"),
        );
        assert_eq!(e.key.as_deref(), Some("files[0].mode"));
        assert_eq!(e.line, Some(4));
        let e = load_err(
            "10-demo",
            &OK.replace("content: \"x\\n\"", "source: nope.conf"),
        );
        assert!(e.message.contains("nope.conf"), "{e}");
        let e = load_err(
            "10-demo",
            &OK.replace("mode: \"0600\" } }", "mode: \"0600\", matches: ['('] } }"),
        );
        assert!(e.message.contains("invalid regex"), "{e}");
        assert_eq!(e.line, Some(6));
        let e = load_err("10-demo", &OK.replace("name: demo", "name: other"));
        assert!(e.message.contains("must match the directory"), "{e}");
        let e = load_err("1-demo", OK);
        assert!(e.message.contains("NN-name"), "{e}");
        let e = load_err(
            "10-demo",
            &OK.replace("faq: [\"4.10.1\"]", "faqs: [\"4.10.1\"]"),
        );
        assert!(e.message.contains("unknown field `faqs`"), "{e}");
        // References are checked against the benchmark tables.
        let e = load_err("10-demo", &OK.replace("\"4.10.1\"", "\"4.12.1\""));
        assert_eq!(e.key.as_deref(), Some("controls[0].refs.faq"));
        assert_eq!(e.line, Some(9), "the refs line");
        let e = load_err(
            "10-demo",
            &OK.replace("refs: {", "refs: { stig: [UBTU-22-999999], "),
        );
        assert!(e.message.contains("`UBTU-22-999999` is no rule"), "{e}");
        let e = load_err(
            "10-demo",
            &OK.replace("refs: {", "refs: { cis: [\"5.2.10\"], "),
        );
        assert!(e.message.contains("BENCHMARK:ID"), "{e}");
        let ok = OK.replace(
            "refs: {",
            "refs: { stig: [UBTU-22-211015], cis: [\"ubuntu2404-v1.0.0:1.1.1.1\"], ",
        );
        let d = tempfile::tempdir().unwrap();
        write_stage(d.path(), "10-demo", &ok);
        let c = Catalog::load(&StageSource::Dir(d.path().into())).unwrap();
        let (_, ctl) = c.controls().next().unwrap();
        assert_eq!(ctl.refs.stig[0].id, "V-260469");
        assert_eq!(ctl.refs.cis[0].benchmark, "ubuntu2404-v1.0.0");
        assert_eq!(ctl.fix, "applied by stage 10-demo: a demo");
        // Schema v1 stage files still load: description, scope: image.
        let v1 = OK.replace(
            "    check:",
            "    description: why\n    scope: image\n    check:",
        );
        let d = tempfile::tempdir().unwrap();
        write_stage(d.path(), "10-demo", &v1);
        let c = Catalog::load(&StageSource::Dir(d.path().into())).unwrap();
        let (_, ctl) = c.controls().next().unwrap();
        assert_eq!(ctl.rationale, "why");
        assert_eq!(ctl.when.target, TargetMode::Offline);
    }

    #[test]
    fn when_matching() {
        let w = When {
            roles: vec!["docker".into()],
            ..Default::default()
        };
        assert!(!w.matches("debian", "bookworm", &[]));
        assert!(w.matches("debian", "bookworm", &["docker".into()]));
        let w = When {
            os: vec!["ubuntu".into()],
            ..Default::default()
        };
        assert!(!w.matches("debian", "bookworm", &[]));
        assert!(w.matches("ubuntu", "noble", &[]));
        assert!(When::default().matches("x", "y", &[]));
        let ctx = |version: &str| crate::scan::ScanContext {
            distro: "ubuntu".into(),
            codename: "jammy".into(),
            version: version.into(),
            pretty_name: String::new(),
            roles: vec![],
            roles_from: "none".into(),
            profile: String::new(),
        };
        let w = When {
            version: vec!["22.04".into()],
            target: TargetMode::Offline,
            ..Default::default()
        };
        assert!(w.applies(&ctx("22.04"), false).is_ok());
        assert!(
            w.applies(&ctx("24.04"), false)
                .unwrap_err()
                .contains("version 22.04")
        );
        assert!(
            w.applies(&ctx("22.04"), true)
                .unwrap_err()
                .contains("offline")
        );
        let live = When {
            target: TargetMode::Live,
            ..Default::default()
        };
        assert!(live.applies(&ctx("22.04"), false).is_err());
        assert!(live.applies(&ctx("22.04"), true).is_ok());
    }
}
