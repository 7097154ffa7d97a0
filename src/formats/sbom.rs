//! Software bills of materials, written natively from an image's dpkg
//! database: SPDX 2.3 JSON, CycloneDX 1.6 JSON, and the `packages.txt` a
//! BOSH stemcell ships (the layout of `dpkg -l`).
//!
//! Every installed package is listed with its name, version, architecture,
//! source package, purl, the licences its machine-readable (DEP-5)
//! copyright file declares, and the SHA-256 of its .deb when apt's package
//! indexes carry it. Equal inputs give byte-equal documents: packages are
//! sorted, and the SPDX namespace and the CycloneDX serial number derive
//! from a hash of the build's inputs.
//!
//! Control files (dpkg's status, apt's Packages indexes, copyright files)
//! are parsed with `deb822-fast`; every file is read inside the image root
//! (symlinks resolve within it) and only up to a size cap.

use super::{Artifact, Format, Job, Producer, Products};
use crate::scan::target::Target;
use anyhow::{Context, Result, bail};
use chrono::{DateTime, Utc};
use deb822_fast::borrowed::{BorrowedParagraph, iter_paragraphs_borrowed};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::LazyLock;

/// Largest dpkg status file or apt package index read, in bytes.
const MAX_INDEX_BYTES: u64 = 512 << 20;
/// Largest part of a copyright file read, in bytes.
const MAX_COPYRIGHT_BYTES: u64 = 1 << 20;
/// The image's dpkg database.
const STATUS: &str = "/var/lib/dpkg/status";

/// One installed package of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// The source package; the package itself when its stanza names none.
    pub source_name: String,
    /// The source version; the package's version unless `Source:` says.
    pub source_version: String,
    /// The first line of the description, as dpkg shows it (a multi-line
    /// description keeps the trailing blanks of its first line).
    pub summary: String,
    pub homepage: Option<String>,
    pub maintainer: Option<String>,
    /// The distinct `License:` short names of the Files paragraphs of the
    /// package's machine-readable copyright file, as written there, in
    /// file order; empty when the file is missing or not machine-readable.
    pub licenses: Vec<String>,
    /// SHA-256 of the .deb, when an apt package index carries it.
    pub sha256: Option<String>,
    pub installed_size_kib: Option<u64>,
    pub section: Option<String>,
    pub multi_arch: Option<String>,
    /// dpkg's `Status:` field, e.g. `install ok installed`.
    pub status: String,
}

/// What the SBOMs say about the image as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SbomMeta {
    /// The image name.
    pub name: String,
    /// The image version.
    pub version: String,
    /// `debian` or `ubuntu`.
    pub distro: String,
    /// `12`, `24.04`, ...
    pub distro_version: String,
    pub codename: String,
    pub created: DateTime<Utc>,
    pub tool_version: String,
    /// A hash of the build's inputs: the SPDX document namespace and the
    /// CycloneDX serial number derive from it, so equal inputs give equal
    /// SBOMs.
    pub namespace_seed: String,
}

impl SbomMeta {
    /// The metadata of a build's image.
    pub fn for_job(job: &Job) -> Result<SbomMeta> {
        let os = &job.profile.os;
        let created = DateTime::from_timestamp(job.epoch, 0)
            .with_context(|| format!("SOURCE_DATE_EPOCH {} is out of range", job.epoch))?;
        Ok(SbomMeta {
            name: job.name.to_string(),
            version: job.version.to_string(),
            distro: os.distro.clone(),
            distro_version: os.version.clone(),
            codename: os.codename.clone(),
            created,
            tool_version: crate::VERSION.to_string(),
            namespace_seed: job.input_hash.to_string(),
        })
    }
}

/// Writes `NAME.spdx.json`, `NAME.cdx.json` and `NAME.packages.txt` from
/// the finished tree's dpkg database.
pub struct Sbom;

/// The files [`Sbom`] writes, as suffixes of the image name.
const SBOM_FILES: [&str; 3] = ["spdx.json", "cdx.json", "packages.txt"];

impl Producer for Sbom {
    fn format(&self) -> Format {
        Format::Sbom
    }

    fn files(&self, name: &str) -> Vec<String> {
        SBOM_FILES.iter().map(|s| format!("{name}.{s}")).collect()
    }

    fn produce(&self, job: &Job, _: &Products) -> Result<(Vec<Artifact>, String)> {
        let pkgs = read_packages(job.tree, job.apt_lists)?;
        let meta = SbomMeta::for_job(job)?;
        let bodies = [
            spdx_json(&pkgs, &meta)?,
            cyclonedx_json(&pkgs, &meta)?,
            packages_txt(&pkgs).into_bytes(),
        ];
        let mut artifacts = Vec::new();
        for (suffix, body) in SBOM_FILES.iter().zip(bodies) {
            let path = job.named(Format::Sbom, suffix);
            crate::fsutil::write_atomic(&path, &body)?;
            artifacts.push(Artifact::of(Format::Sbom, &path)?);
        }
        let summed = pkgs.iter().filter(|p| p.sha256.is_some()).count();
        let note = format!("{} packages, {summed} with .deb checksums", pkgs.len());
        Ok((artifacts, note))
    }
}

// ---------------------------------------------------------------------------
// Reading the image

/// The installed packages of the image rooted at `root`, sorted by name
/// then architecture, with licences from their copyright files and .deb
/// checksums from the `*_Packages` indexes in `apt_lists` (a host
/// directory, typically the bootstrapped tree's `var/lib/apt/lists`).
pub fn read_packages(root: &Path, apt_lists: Option<&Path>) -> Result<Vec<Package>> {
    let target = Target::root(root)?;
    let status = read_index(&target, STATUS)
        .with_context(|| format!("reading the dpkg database of {}", root.display()))?;
    let mut pkgs =
        parse_status(&status).with_context(|| format!("parsing {}{STATUS}", root.display()))?;
    pkgs.sort_by(|a, b| (&a.name, &a.architecture).cmp(&(&b.name, &b.architecture)));
    for p in &mut pkgs {
        p.licenses = package_licenses(&target, &p.name)?;
    }
    if let Some(dir) = apt_lists {
        let sums = deb_checksums(dir, &pkgs)?;
        for p in &mut pkgs {
            p.sha256 = sums
                .get(&deb_key(&p.name, &p.version, &p.architecture))
                .cloned();
        }
    }
    Ok(pkgs)
}

/// The packages of a dpkg status file whose files are installed (state
/// `installed`, whatever the selection: held packages count). Config-files
/// and half-installed packages are left out.
fn parse_status(text: &str) -> Result<Vec<Package>> {
    let mut out = Vec::new();
    for (n, para) in iter_paragraphs_borrowed(text).enumerate() {
        let para = para.with_context(|| format!("stanza {}", n + 1))?;
        let status = first_line(&para, "Status").unwrap_or_default();
        if status.split_whitespace().nth(2) != Some("installed") {
            continue;
        }
        out.push(installed_package(&para, status).with_context(|| format!("stanza {}", n + 1))?);
    }
    Ok(out)
}

fn installed_package(para: &BorrowedParagraph, status: &str) -> Result<Package> {
    let required = |field: &str| {
        first_line(para, field)
            .map(str::to_string)
            .with_context(|| format!("an installed package without {field}"))
    };
    let name = required("Package")?;
    let version = required("Version")?;
    let architecture = required("Architecture")?;
    let (source_name, source_version) = match first_line(para, "Source") {
        None => (name.clone(), version.clone()),
        Some(s) => match s.split_once('(') {
            Some((n, v)) => (
                n.trim().to_string(),
                v.trim_end_matches(')').trim().to_string(),
            ),
            None => (s.to_string(), version.clone()),
        },
    };
    let optional = |field: &str| first_line(para, field).map(str::to_string);
    Ok(Package {
        summary: summary(para),
        homepage: optional("Homepage"),
        maintainer: optional("Maintainer"),
        installed_size_kib: first_line(para, "Installed-Size").and_then(|s| s.parse().ok()),
        section: optional("Section"),
        multi_arch: optional("Multi-Arch"),
        status: status.to_string(),
        licenses: Vec::new(),
        sha256: None,
        name,
        version,
        architecture,
        source_name,
        source_version,
    })
}

/// The first line of `Description:` as `dpkg -l` prints it: dpkg trims
/// a field's value at both ends, which leaves the end of the first line
/// of a multi-line value alone.
fn summary(para: &BorrowedParagraph) -> String {
    match para.get("Description") {
        Some([one]) => one.trim().to_string(),
        Some([first, ..]) => first.trim_start().to_string(),
        _ => String::new(),
    }
}

/// The first line of a field, trimmed; `None` when absent or empty.
fn first_line<'a>(para: &BorrowedParagraph<'a>, field: &str) -> Option<&'a str> {
    let line = para.get(field)?.first()?.trim();
    (!line.is_empty()).then_some(line)
}

/// A whole index file inside `target` (the dpkg status, an apt index).
fn read_index(target: &Target, path: &str) -> Result<String> {
    match read_capped(target, path, MAX_INDEX_BYTES)? {
        Some((text, false)) => Ok(text),
        Some((_, true)) => bail!("{path} is larger than {MAX_INDEX_BYTES} bytes"),
        None => bail!("{path} is missing or not a regular file"),
    }
}

/// Up to `cap` bytes of the regular file `path` inside `target` (symlinks
/// resolved within it) and whether there was more; `None` when it does not
/// exist or is no regular file.
fn read_capped(target: &Target, path: &str, cap: u64) -> Result<Option<(String, bool)>> {
    match target.read_head(path, cap) {
        Ok((bytes, more)) => Ok(Some((String::from_utf8_lossy(&bytes).into_owned(), more))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        // Not a regular file (a symlink to a directory, say): no licence.
        Err(e) if e.to_string().contains("not a regular file") => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {path}")),
    }
}

/// The licences of the copyright file in the package's doc directory.
fn package_licenses(target: &Target, name: &str) -> Result<Vec<String>> {
    let path = format!("/usr/share/doc/{name}/copyright");
    Ok(match read_capped(target, &path, MAX_COPYRIGHT_BYTES)? {
        None => Vec::new(),
        Some((text, false)) => copyright_licenses(&text),
        // Past the cap: the complete paragraphs only.
        Some((text, true)) => copyright_licenses(text.rsplit_once("\n\n").map_or("", |c| c.0)),
    })
}

/// The distinct `License:` short names of the Files paragraphs of a
/// machine-readable (DEP-5) copyright file, in file order, whitespace
/// collapsed; empty for any other file, and for one that does not parse.
/// Lines of blanks separate paragraphs, as Debian policy lets parsers
/// accept (in the copyright format an empty line of a text is ` .`).
pub fn copyright_licenses(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(|l| if l.trim().is_empty() { "" } else { l })
        .collect();
    let text = lines.join("\n");
    let Ok(paras) = iter_paragraphs_borrowed(&text).collect::<Result<Vec<_>, _>>() else {
        return Vec::new();
    };
    let Some((header, rest)) = paras.split_first() else {
        return Vec::new();
    };
    let format =
        first_line(header, "Format").or_else(|| first_line(header, "Format-Specification"));
    let dep5 = format.is_some_and(|f| {
        let f = f.to_ascii_lowercase();
        f.contains("copyright-format") || f.contains("dep5")
    });
    if !dep5 {
        return Vec::new();
    }
    let mut out: Vec<String> = Vec::new();
    for para in rest.iter().filter(|p| p.get_field("Files").is_some()) {
        if let Some(l) = first_line(para, "License") {
            let l = l.split_whitespace().collect::<Vec<_>>().join(" ");
            if !out.contains(&l) {
                out.push(l);
            }
        }
    }
    out
}

/// The key of a .deb in apt's indexes.
fn deb_key(name: &str, version: &str, arch: &str) -> String {
    format!("{name} {version} {arch}")
}

/// SHA-256 of each installed package's .deb from the `*_Packages` files
/// of `dir` (read in name order; the first index that has a package wins).
fn deb_checksums(dir: &Path, pkgs: &[Package]) -> Result<HashMap<String, String>> {
    let wanted: HashSet<String> = pkgs
        .iter()
        .map(|p| deb_key(&p.name, &p.version, &p.architecture))
        .collect();
    let lists = Target::root(dir)?;
    let names = lists
        .list_dir("/")
        .with_context(|| format!("listing {}", dir.display()))?;
    let mut sums = HashMap::new();
    for name in names.iter().filter(|n| n.ends_with("_Packages")) {
        let Some((text, false)) = read_capped(&lists, name, MAX_INDEX_BYTES)? else {
            bail!("{}/{name} is no regular file or too large", dir.display());
        };
        index_checksums(&text, &wanted, &mut sums)
            .with_context(|| format!("parsing {}/{name}", dir.display()))?;
    }
    Ok(sums)
}

/// Add the `SHA256` of every wanted package of one Packages index.
fn index_checksums(
    text: &str,
    wanted: &HashSet<String>,
    sums: &mut HashMap<String, String>,
) -> Result<()> {
    for para in iter_paragraphs_borrowed(text) {
        let para = para?;
        let field = |f| first_line(&para, f).unwrap_or_default();
        let key = deb_key(field("Package"), field("Version"), field("Architecture"));
        let sha = field("SHA256").to_ascii_lowercase();
        let valid = sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit());
        if valid && wanted.contains(&key) {
            sums.entry(key).or_insert(sha);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Licences

/// A licence expression of a copyright file: SPDX ids where the Debian
/// short name is equivalent to one, the short name itself otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Licence {
    Id(&'static str),
    Other(String),
    All(Vec<Licence>),
    Any(Vec<Licence>),
}

impl Licence {
    /// Parse one `License:` short name of the copyright format: `A or B`,
    /// `A and B` (`and` binds tighter), a comma before `and`/`or` closing
    /// what precedes it, and `X with Y exception` as one licence. Anything
    /// else is one licence named by the whole text.
    fn parse(short: &str) -> Licence {
        let mut segments = short.split(',');
        let Some(mut acc) = segments.next().and_then(Licence::parse_segment) else {
            return Licence::atom(short);
        };
        for segment in segments {
            let (op, rest) = segment
                .trim_start()
                .split_once(char::is_whitespace)
                .unwrap_or(("", ""));
            let Some(right) = Licence::parse_segment(rest) else {
                return Licence::atom(short);
            };
            acc = match op.to_ascii_lowercase().as_str() {
                "and" => Licence::join(true, vec![acc, right]),
                "or" => Licence::join(false, vec![acc, right]),
                _ => return Licence::atom(short),
            };
        }
        acc
    }

    /// Alternatives of conjunctions of licence names, without commas.
    fn parse_segment(text: &str) -> Option<Licence> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let is = |w: &str, k: &str| w.eq_ignore_ascii_case(k);
        let mut any = Vec::new();
        for alternative in words.split(|w| is(w, "or")) {
            let mut all = Vec::new();
            for name in alternative.split(|w| is(w, "and")) {
                if name.is_empty() {
                    return None;
                }
                all.push(Licence::atom(&name.join(" ")));
            }
            any.push(Licence::join(true, all));
        }
        Some(Licence::join(false, any))
    }

    fn atom(name: &str) -> Licence {
        let name = name.trim();
        spdx_id(name).map_or_else(|| Licence::Other(name.to_string()), Licence::Id)
    }

    /// `AND` (`all`) or `OR` of `parts`, nested ones of the same kind
    /// flattened; a single part stands alone.
    fn join(all: bool, parts: Vec<Licence>) -> Licence {
        let mut flat = Vec::new();
        for p in parts {
            match p {
                Licence::All(v) if all => flat.extend(v),
                Licence::Any(v) if !all => flat.extend(v),
                p => flat.push(p),
            }
        }
        match (flat.len(), all) {
            (1, _) => flat.pop().expect("one part"),
            (_, true) => Licence::All(flat),
            (_, false) => Licence::Any(flat),
        }
    }

    fn is_compound(&self) -> bool {
        matches!(self, Licence::All(_) | Licence::Any(_))
    }

    /// The SPDX expression, with `LicenseRef-`s from `refs`.
    fn render(&self, refs: &mut LicenceRefs) -> String {
        let join = |parts: &[Licence], op: &str, refs: &mut LicenceRefs| {
            let items: Vec<String> = parts.iter().map(|p| p.render_grouped(refs)).collect();
            items.join(op)
        };
        match self {
            Licence::Id(id) => id.to_string(),
            Licence::Other(name) => refs.id_for(name),
            Licence::All(v) => join(v, " AND ", refs),
            Licence::Any(v) => join(v, " OR ", refs),
        }
    }

    fn render_grouped(&self, refs: &mut LicenceRefs) -> String {
        if self.is_compound() {
            format!("({})", self.render(refs))
        } else {
            self.render(refs)
        }
    }
}

/// The distinct licences a package declares (one per copyright short
/// name, equivalent names merged).
fn declared(p: &Package) -> Vec<Licence> {
    let mut out: Vec<Licence> = Vec::new();
    for l in p.licenses.iter().map(|s| Licence::parse(s)) {
        if !out.contains(&l) {
            out.push(l);
        }
    }
    out
}

/// The SPDX expression of a package's declared licences (joined with
/// `AND`), or `NOASSERTION` when its copyright file names none.
fn declared_expression(licences: &[Licence], refs: &mut LicenceRefs) -> String {
    match licences {
        [] => "NOASSERTION".to_string(),
        [one] => one.render(refs),
        many => Licence::All(many.to_vec()).render(refs),
    }
}

/// `LicenseRef-` identifiers for licence names that are no SPDX id, one
/// per distinct name in the order first met, and the packages using each.
#[derive(Default)]
struct LicenceRefs {
    ids: BTreeMap<String, String>,
    taken: BTreeSet<String>,
    users: BTreeMap<String, BTreeSet<String>>,
}

impl LicenceRefs {
    fn id_for(&mut self, name: &str) -> String {
        if let Some(id) = self.ids.get(name) {
            return id.clone();
        }
        let id = unique(&mut self.taken, &format!("LicenseRef-{}", id_string(name)));
        self.ids.insert(name.to_string(), id.clone());
        id
    }

    fn note_user(&mut self, name: &str, package: &str) {
        self.users
            .entry(name.to_string())
            .or_default()
            .insert(package.to_string());
    }
}

/// `s` with every character outside SPDX's idstring set (`A-Za-z0-9.-`)
/// replaced: `+` by `plus`, the others by `-`.
fn id_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '-' => out.push(c),
            '+' => out.push_str("plus"),
            _ => out.push('-'),
        }
    }
    out
}

/// `wanted`, or `wanted-2`, `wanted-3`, ... if taken; recorded as taken.
fn unique(taken: &mut BTreeSet<String>, wanted: &str) -> String {
    let mut id = wanted.to_string();
    let mut n = 1;
    while taken.contains(&id) {
        n += 1;
        id = format!("{wanted}-{n}");
    }
    taken.insert(id.clone());
    id
}

/// The SPDX licence id equivalent to a Debian short name, if any: GNU
/// names (`GPL-2+` is `GPL-2.0-or-later`, `LGPL-2.1` is `LGPL-2.1-only`,
/// `GFDL-NIV-1.3+` is `GFDL-1.3-no-invariants-or-later`), `Expat` (MIT),
/// any id of the SPDX list in any case (`BSD-3-clause`), and `NAME-N` for
/// `NAME-N.0` (`Apache-2`).
fn spdx_id(name: &str) -> Option<&'static str> {
    static GNU: LazyLock<regex::Regex> = LazyLock::new(|| {
        regex::Regex::new(
            r"(?i)^(AGPL|LGPL|GPL|GFDL-NIV|GFDL)-([0-9]+)(\.[0-9]+)?(\+|-only|-or-later)?$",
        )
        .expect("valid pattern")
    });
    if name.eq_ignore_ascii_case("expat") {
        return Some("MIT");
    }
    if let Some(c) = GNU.captures(name) {
        let family = c[1].to_ascii_uppercase();
        let version = format!("{}{}", &c[2], c.get(3).map_or(".0", |m| m.as_str()));
        let later = c
            .get(4)
            .is_some_and(|m| !m.as_str().eq_ignore_ascii_case("-only"));
        let suffix = if later { "or-later" } else { "only" };
        let id = match family.as_str() {
            "GFDL-NIV" => format!("GFDL-{version}-no-invariants-{suffix}"),
            f => format!("{f}-{version}-{suffix}"),
        };
        return listed_id(&id);
    }
    listed_id(name).or_else(|| {
        let (_, major) = name.rsplit_once('-')?;
        if major.is_empty() || !major.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        listed_id(&format!("{name}.0"))
    })
}

/// The id of the SPDX licence list spelled `name` in any case.
fn listed_id(name: &str) -> Option<&'static str> {
    static BY_LOWER: LazyLock<HashMap<String, &'static str>> = LazyLock::new(|| {
        SPDX_LICENCE_IDS
            .split_whitespace()
            .map(|id| (id.to_ascii_lowercase(), id))
            .collect()
    });
    BY_LOWER.get(&name.to_ascii_lowercase()).copied()
}

/// The licence ids of the SPDX licence list, as the CycloneDX 1.6 schema
/// enumerates them in its `spdx.schema.json` (exceptions left out), so
/// that every id written here passes both formats' validators.
const SPDX_LICENCE_IDS: &str = "
0BSD 3D-Slicer-1.0 AAL Abstyles AdaCore-doc Adobe-2006
Adobe-Display-PostScript Adobe-Glyph Adobe-Utopia ADSL
Advanced-Cryptics-Dictionary AFL-1.1 AFL-1.2 AFL-2.0 AFL-2.1 AFL-3.0
Afmparse AGPL-1.0 AGPL-1.0-only AGPL-1.0-or-later AGPL-3.0 AGPL-3.0-only
AGPL-3.0-or-later Aladdin ALGLIB-Documentation AMD-newlib AMDPLPA AML
AML-glslang AMPAS ANTLR-PD ANTLR-PD-fallback any-OSI any-OSI-perl-modules
Apache-1.0 Apache-1.1 Apache-2.0 APAFML APL-1.0 App-s2p APSL-1.0 APSL-1.1
APSL-1.2 APSL-2.0 Arphic-1999 Artistic-1.0 Artistic-1.0-cl8
Artistic-1.0-Perl Artistic-2.0 Artistic-dist Aspell-RU
ASWF-Digital-Assets-1.0 ASWF-Digital-Assets-1.1 Baekmuk Bahyph Barr
bcrypt-Solar-Designer Beerware Bitstream-Charter Bitstream-Vera
BitTorrent-1.0 BitTorrent-1.1 blessing BlueOak-1.0.0 Boehm-GC
Boehm-GC-without-fee BOLA-1.1 Borceux Brian-Gladman-2-Clause
Brian-Gladman-3-Clause BSD-1-Clause BSD-2-Clause BSD-2-Clause-Darwin
BSD-2-Clause-first-lines BSD-2-Clause-FreeBSD BSD-2-Clause-NetBSD
BSD-2-Clause-Patent BSD-2-Clause-pkgconf-disclaimer BSD-2-Clause-Views
BSD-3-Clause BSD-3-Clause-acpica BSD-3-Clause-Attribution BSD-3-Clause-Clear
BSD-3-Clause-flex BSD-3-Clause-HP BSD-3-Clause-LBNL
BSD-3-Clause-Modification BSD-3-Clause-No-Military-License
BSD-3-Clause-No-Nuclear-License BSD-3-Clause-No-Nuclear-License-2014
BSD-3-Clause-No-Nuclear-Warranty BSD-3-Clause-Open-MPI BSD-3-Clause-Sun
BSD-3-Clause-Tso BSD-4-Clause BSD-4-Clause-Shortened BSD-4-Clause-UC
BSD-4.3RENO BSD-4.3TAHOE BSD-Advertising-Acknowledgement
BSD-Attribution-HPND-disclaimer BSD-Inferno-Nettverk BSD-Mark-Modifications
BSD-Protection BSD-Source-beginning-file BSD-Source-Code BSD-Systemics
BSD-Systemics-W3Works BSL-1.0 Buddy BUSL-1.1 bzip2-1.0.5 bzip2-1.0.6
C-UDA-1.0 CAL-1.0 CAL-1.0-Combined-Work-Exception Caldera
Caldera-no-preamble CAPEC-tou Catharon CATOSL-1.1 CC-BY-1.0 CC-BY-2.0
CC-BY-2.5 CC-BY-2.5-AU CC-BY-3.0 CC-BY-3.0-AT CC-BY-3.0-AU CC-BY-3.0-DE
CC-BY-3.0-IGO CC-BY-3.0-NL CC-BY-3.0-US CC-BY-4.0 CC-BY-NC-1.0 CC-BY-NC-2.0
CC-BY-NC-2.5 CC-BY-NC-3.0 CC-BY-NC-3.0-DE CC-BY-NC-4.0 CC-BY-NC-ND-1.0
CC-BY-NC-ND-2.0 CC-BY-NC-ND-2.5 CC-BY-NC-ND-3.0 CC-BY-NC-ND-3.0-DE
CC-BY-NC-ND-3.0-IGO CC-BY-NC-ND-4.0 CC-BY-NC-SA-1.0 CC-BY-NC-SA-2.0
CC-BY-NC-SA-2.0-DE CC-BY-NC-SA-2.0-FR CC-BY-NC-SA-2.0-UK CC-BY-NC-SA-2.5
CC-BY-NC-SA-3.0 CC-BY-NC-SA-3.0-DE CC-BY-NC-SA-3.0-IGO CC-BY-NC-SA-4.0
CC-BY-ND-1.0 CC-BY-ND-2.0 CC-BY-ND-2.5 CC-BY-ND-3.0 CC-BY-ND-3.0-DE
CC-BY-ND-4.0 CC-BY-SA-1.0 CC-BY-SA-2.0 CC-BY-SA-2.0-UK CC-BY-SA-2.1-JP
CC-BY-SA-2.5 CC-BY-SA-3.0 CC-BY-SA-3.0-AT CC-BY-SA-3.0-DE CC-BY-SA-3.0-IGO
CC-BY-SA-4.0 CC-PDDC CC-PDM-1.0 CC-SA-1.0 CC0-1.0 CDDL-1.0 CDDL-1.1 CDL-1.0
CDLA-Permissive-1.0 CDLA-Permissive-2.0 CDLA-Sharing-1.0 CECILL-1.0
CECILL-1.1 CECILL-2.0 CECILL-2.1 CECILL-B CECILL-C CERN-OHL-1.1 CERN-OHL-1.2
CERN-OHL-P-2.0 CERN-OHL-S-2.0 CERN-OHL-W-2.0 CFITSIO check-cvs checkmk
ClArtistic Clips CMU-Mach CMU-Mach-nodoc CNRI-Jython CNRI-Python
CNRI-Python-GPL-Compatible COIL-1.0 Community-Spec-1.0 Condor-1.1
copyleft-next-0.3.0 copyleft-next-0.3.1 Cornell-Lossless-JPEG CPAL-1.0
CPL-1.0 CPOL-1.02 Cronyx Crossword CryptoSwift CrystalStacker CUA-OPL-1.0
Cube curl cve-tou D-FSL-1.0 DEC-3-Clause diffmark DL-DE-BY-2.0
DL-DE-ZERO-2.0 DOC DocBook-DTD DocBook-Schema DocBook-Stylesheet DocBook-XML
Dotseqn DRL-1.0 DRL-1.1 DSDP dtoa dvipdfm ECL-1.0 ECL-2.0 eCos-2.0 EFL-1.0
EFL-2.0 eGenix Elastic-2.0 Entessa EPICS EPL-1.0 EPL-2.0 ErlPL-1.1
ESA-PL-permissive-2.4 ESA-PL-strong-copyleft-2.4 ESA-PL-weak-copyleft-2.4
etalab-2.0 EUDatagrid EUPL-1.0 EUPL-1.1 EUPL-1.2 Eurosym Fair FBM FDK-AAC
Ferguson-Twofish Frameworx-1.0 FreeBSD-DOC FreeImage FSFAP
FSFAP-no-warranty-disclaimer FSFUL FSFULLR FSFULLRSD FSFULLRWD FSL-1.1-ALv2
FSL-1.1-MIT FTL Furuseth fwlw Game-Programming-Gems GCR-docs GD generic-xts
GFDL-1.1 GFDL-1.1-invariants-only GFDL-1.1-invariants-or-later
GFDL-1.1-no-invariants-only GFDL-1.1-no-invariants-or-later GFDL-1.1-only
GFDL-1.1-or-later GFDL-1.2 GFDL-1.2-invariants-only
GFDL-1.2-invariants-or-later GFDL-1.2-no-invariants-only
GFDL-1.2-no-invariants-or-later GFDL-1.2-only GFDL-1.2-or-later GFDL-1.3
GFDL-1.3-invariants-only GFDL-1.3-invariants-or-later
GFDL-1.3-no-invariants-only GFDL-1.3-no-invariants-or-later GFDL-1.3-only
GFDL-1.3-or-later Giftware GL2PS Glide Glulxe GLWTPL gnuplot GPL-1.0
GPL-1.0+ GPL-1.0-only GPL-1.0-or-later GPL-2.0 GPL-2.0+ GPL-2.0-only
GPL-2.0-or-later GPL-2.0-with-autoconf-exception
GPL-2.0-with-bison-exception GPL-2.0-with-classpath-exception
GPL-2.0-with-font-exception GPL-2.0-with-GCC-exception GPL-3.0 GPL-3.0+
GPL-3.0-only GPL-3.0-or-later GPL-3.0-with-autoconf-exception
GPL-3.0-with-GCC-exception Graphics-Gems gSOAP-1.3b gtkbook Gutmann
HaskellReport HDF5 hdparm HIDAPI Hippocratic-2.1 HP-1986 HP-1989 HPND
HPND-DEC HPND-doc HPND-doc-sell HPND-export-US
HPND-export-US-acknowledgement HPND-export-US-modify HPND-export2-US
HPND-Fenneberg-Livingston HPND-INRIA-IMAG HPND-Intel HPND-Kevlin-Henney
HPND-Markus-Kuhn HPND-merchantability-variant HPND-MIT-disclaimer
HPND-Netrek HPND-Pbmplus HPND-sell-MIT-disclaimer-xserver HPND-sell-regexpr
HPND-sell-variant HPND-sell-variant-critical-systems
HPND-sell-variant-MIT-disclaimer HPND-sell-variant-MIT-disclaimer-rev
HPND-SMC HPND-UC HPND-UC-export-US HTMLTIDY hyphen-bulgarian IBM-pibs ICU
IEC-Code-Components-EULA IJG IJG-short ImageMagick iMatix Imlib2 Info-ZIP
Inner-Net-2.0 InnoSetup Intel Intel-ACPI Interbase-1.0 IPA IPL-1.0 ISC
ISC-Veillard ISO-permission Jam JasPer-2.0 jove JPL-image JPNIC JSON Kastrup
Kazlib Knuth-CTAN LAL-1.2 LAL-1.3 Latex2e Latex2e-translated-notice
Leptonica LGPL-2.0 LGPL-2.0+ LGPL-2.0-only LGPL-2.0-or-later LGPL-2.1
LGPL-2.1+ LGPL-2.1-only LGPL-2.1-or-later LGPL-3.0 LGPL-3.0+ LGPL-3.0-only
LGPL-3.0-or-later LGPLLR Libpng libpng-1.6.35 libpng-2.0 libselinux-1.0
libtiff libutil-David-Nugent LiLiQ-P-1.1 LiLiQ-R-1.1 LiLiQ-Rplus-1.1
Linux-man-pages-1-para Linux-man-pages-copyleft
Linux-man-pages-copyleft-2-para Linux-man-pages-copyleft-var Linux-OpenIB
LOOP LPD-document LPL-1.0 LPL-1.02 LPPL-1.0 LPPL-1.1 LPPL-1.2 LPPL-1.3a
LPPL-1.3c lsof Lucida-Bitmap-Fonts LZMA-SDK-9.11-to-9.20 LZMA-SDK-9.22
Mackerras-3-Clause Mackerras-3-Clause-acknowledgment magaz mailprio
MakeIndex man2html Martin-Birgmeier McPhee-slideshow metamail Minpack MIPS
MirOS MIT MIT-0 MIT-advertising MIT-Click MIT-CMU MIT-enna MIT-feh
MIT-Festival MIT-Khronos-old MIT-Modern-Variant MIT-open-group MIT-STK
MIT-testregex MIT-Wu MITNFA MMIXware MMPL-1.0.1 Motosoto MPEG-SSG
mpi-permissive mpich2 MPL-1.0 MPL-1.1 MPL-2.0 MPL-2.0-no-copyleft-exception
mplus MS-LPL MS-PL MS-RL MTLL MulanPSL-1.0 MulanPSL-2.0 Multics Mup
NAIST-2003 NASA-1.3 Naumen NBPL-1.0 NCBI-PD NCGL-UK-2.0 NCL NCSA Net-SNMP
NetCDF Newsletr NGPL ngrep NICTA-1.0 NIST-PD NIST-PD-fallback NIST-PD-TNT
NIST-Software NLOD-1.0 NLOD-2.0 NLPL Nokia NOSL Noweb NPL-1.0 NPL-1.1
NPOSL-3.0 NRL NTIA-PD NTP NTP-0 Nunit O-UDA-1.0 OAR OCCT-PL OCLC-2.0
ODbL-1.0 ODC-By-1.0 OFFIS OFL-1.0 OFL-1.0-no-RFN OFL-1.0-RFN OFL-1.1
OFL-1.1-no-RFN OFL-1.1-RFN OGC-1.0 OGDL-Taiwan-1.0 OGL-Canada-2.0 OGL-UK-1.0
OGL-UK-2.0 OGL-UK-3.0 OGTSL OLDAP-1.1 OLDAP-1.2 OLDAP-1.3 OLDAP-1.4
OLDAP-2.0 OLDAP-2.0.1 OLDAP-2.1 OLDAP-2.2 OLDAP-2.2.1 OLDAP-2.2.2 OLDAP-2.3
OLDAP-2.4 OLDAP-2.5 OLDAP-2.6 OLDAP-2.7 OLDAP-2.8 OLFL-1.3 OML OpenMDW-1.0
OpenPBS-2.3 OpenSSL OpenSSL-standalone OpenVision OPL-1.0 OPL-UK-3.0
OPUBL-1.0 OSC-1.0 OSET-PL-2.1 OSL-1.0 OSL-1.1 OSL-2.0 OSL-2.1 OSL-3.0 OSSP
PADL ParaType-Free-Font-1.3 Parity-6.0.0 Parity-7.0.0 PDDL-1.0 PHP-3.0
PHP-3.01 Pixar pkgconf Plexus pnmstitch PolyForm-Noncommercial-1.0.0
PolyForm-Small-Business-1.0.0 PostgreSQL PPL PSF-2.0 psfrag psutils
Python-2.0 Python-2.0.1 python-ldap Qhull QPL-1.0 QPL-1.0-INRIA-2004 radvd
Rdisc RHeCos-1.1 RPL-1.1 RPL-1.5 RPSL-1.0 RSA-MD RSCPL Ruby Ruby-pty SAX-PD
SAX-PD-2.0 Saxpath SCEA SchemeReport Sendmail Sendmail-8.23
Sendmail-Open-Source-1.1 SGI-B-1.0 SGI-B-1.1 SGI-B-2.0 SGI-OpenGL SGMLUG-PM
SGP4 SHL-0.5 SHL-0.51 SimPL-2.0 SISSL SISSL-1.2 SL Sleepycat SMAIL-GPL SMLNJ
SMPPL SNIA snprintf SOFA softSurfer Soundex Spencer-86 Spencer-94 Spencer-99
SPL-1.0 ssh-keyscan SSH-OpenSSH SSH-short SSLeay-standalone SSPL-1.0
StandardML-NJ SugarCRM-1.1.3 SUL-1.0 Sun-PPP Sun-PPP-2000 SunPro SWL swrule
Symlinks TAPR-OHL-1.0 TCL TCP-wrappers TekHVC TermReadKey TGPPL-1.0 ThirdEye
threeparttable TMate TORQUE-1.1 TOSL TPDL TPL-1.0 TrustedQSL TTWL TTYP0
TU-Berlin-1.0 TU-Berlin-2.0 Ubuntu-font-1.0 UCAR UCL-1.0 ulem UMich-Merit
Unicode-3.0 Unicode-DFS-2015 Unicode-DFS-2016 Unicode-TOU UnixCrypt
Unlicense Unlicense-libtelnet Unlicense-libwhirlpool UnRAR UPL-1.0 URT-RLE
Vim Vixie-Cron VOSTROM VSL-1.0 W3C W3C-19980720 W3C-20150513 w3m Watcom-1.0
Widget-Workshop WordNet Wsuipa WTFNMFPL WTFPL wwl wxWindows X11
X11-distribute-modifications-variant X11-no-permit-persons X11-swapped
Xdebug-1.03 Xerox Xfig XFree86-1.1 xinetd xkeyboard-config-Zinoviev xlock
Xnet xpp XSkat xzoom YPL-1.0 YPL-1.1 Zed Zeeff Zend-2.0 Zimbra-1.3
Zimbra-1.4 Zlib zlib-acknowledgement ZPL-1.1 ZPL-2.0 ZPL-2.1
";

// ---------------------------------------------------------------------------
// purls and identifiers

/// The package URL of a binary package:
/// `pkg:deb/debian/NAME@VERSION?arch=amd64&distro=debian-12`.
pub fn purl(p: &Package, meta: &SbomMeta) -> String {
    deb_purl(&p.name, &p.version, &p.architecture, meta)
}

fn deb_purl(name: &str, version: &str, arch: &str, meta: &SbomMeta) -> String {
    let distro = format!("{}-{}", meta.distro, meta.distro_version);
    format!(
        "pkg:deb/{}/{}@{}?arch={}&distro={}",
        purl_escape(&meta.distro),
        purl_escape(name),
        purl_escape(version),
        purl_escape(arch),
        purl_escape(&distro)
    )
}

/// Percent-encode a purl component: everything but ASCII letters, digits,
/// `.-_~` and `:` (`1:2.66-4+b2` is `1:2.66-4%2Bb2`).
fn purl_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b".-_~:".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A UUID (version 5) naming this image's SBOM of kind `kind`; equal
/// metadata gives an equal UUID.
fn document_uuid(meta: &SbomMeta, kind: &str) -> uuid::Uuid {
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(uuid::Uuid::NAMESPACE_URL.as_bytes());
    for part in [kind, &meta.namespace_seed, &meta.name, &meta.version] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// `creationInfo.created` / `metadata.timestamp`: RFC 3339, seconds, `Z`.
fn timestamp(meta: &SbomMeta) -> String {
    meta.created.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Whether a package is a library rather than a program, by its section.
fn is_library(p: &Package) -> bool {
    const LIBRARY_SECTIONS: [&str; 15] = [
        "libs",
        "libdevel",
        "oldlibs",
        "perl",
        "python",
        "ruby",
        "java",
        "javascript",
        "golang",
        "rust",
        "php",
        "ocaml",
        "haskell",
        "lisp",
        "gnu-r",
    ];
    let section = p.section.as_deref().unwrap_or_default();
    let section = section.rsplit('/').next().unwrap_or_default();
    LIBRARY_SECTIONS.contains(&section)
}

/// A homepage both formats accept as a URL.
fn homepage(p: &Package) -> Option<String> {
    let h = p.homepage.as_deref()?;
    let web = h.starts_with("http://") || h.starts_with("https://");
    (web && !h.contains(char::is_whitespace)).then(|| h.to_string())
}

/// The maintainer's name and e-mail address (`Name <address>`).
fn maintainer(p: &Package) -> Option<(String, Option<String>)> {
    let m = p.maintainer.as_deref()?;
    let (name, email) = match m.split_once('<') {
        Some((n, rest)) => (n, rest.split_once('>').map(|e| e.0.trim().to_string())),
        None => (m, None),
    };
    let name: String = name.chars().filter(|c| !matches!(c, '(' | ')')).collect();
    let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
    (!name.is_empty()).then_some((name, email))
}

// ---------------------------------------------------------------------------
// SPDX 2.3

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpdxDocument {
    spdx_version: &'static str,
    data_license: &'static str,
    #[serde(rename = "SPDXID")]
    spdx_id: &'static str,
    name: String,
    document_namespace: String,
    creation_info: SpdxCreationInfo,
    packages: Vec<SpdxPackage>,
    relationships: Vec<SpdxRelationship>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    has_extracted_licensing_infos: Vec<SpdxExtractedLicence>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpdxCreationInfo {
    created: String,
    creators: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpdxPackage {
    #[serde(rename = "SPDXID")]
    spdx_id: String,
    name: String,
    version_info: String,
    supplier: String,
    download_location: &'static str,
    files_analyzed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    homepage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_info: Option<String>,
    license_concluded: &'static str,
    license_declared: String,
    copyright_text: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    external_refs: Vec<SpdxExternalRef>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    checksums: Vec<SpdxChecksum>,
    primary_package_purpose: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpdxExternalRef {
    reference_category: &'static str,
    reference_type: &'static str,
    reference_locator: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpdxChecksum {
    algorithm: &'static str,
    checksum_value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpdxRelationship {
    spdx_element_id: String,
    relationship_type: &'static str,
    related_spdx_element: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpdxExtractedLicence {
    license_id: String,
    extracted_text: String,
    name: String,
}

const NOASSERTION: &str = "NOASSERTION";

impl SpdxPackage {
    /// A package with nothing asserted but its identity.
    fn new(spdx_id: String, name: &str, version: &str, purpose: &'static str) -> SpdxPackage {
        SpdxPackage {
            spdx_id,
            name: name.to_string(),
            version_info: version.to_string(),
            supplier: NOASSERTION.to_string(),
            download_location: NOASSERTION,
            files_analyzed: false,
            homepage: None,
            source_info: None,
            license_concluded: NOASSERTION,
            license_declared: NOASSERTION.to_string(),
            copyright_text: NOASSERTION,
            summary: None,
            external_refs: Vec::new(),
            checksums: Vec::new(),
            primary_package_purpose: purpose,
        }
    }

    fn purl(mut self, purl: String) -> SpdxPackage {
        self.external_refs.push(SpdxExternalRef {
            reference_category: "PACKAGE-MANAGER",
            reference_type: "purl",
            reference_locator: purl,
        });
        self
    }
}

fn relationship(from: &str, kind: &'static str, to: &str) -> SpdxRelationship {
    SpdxRelationship {
        spdx_element_id: from.to_string(),
        relationship_type: kind,
        related_spdx_element: to.to_string(),
    }
}

/// The SPDX 2.3 JSON document: the image (the document DESCRIBES it)
/// CONTAINS every package, each GENERATED_FROM its source package.
pub fn spdx_json(pkgs: &[Package], meta: &SbomMeta) -> Result<Vec<u8>> {
    let mut taken = BTreeSet::from(["SPDXRef-DOCUMENT".to_string()]);
    let image_id = unique(&mut taken, "SPDXRef-Image");
    let mut image = SpdxPackage::new(
        image_id.clone(),
        &meta.name,
        &meta.version,
        "OPERATING-SYSTEM",
    );
    image.summary = Some(os_description(meta));
    let mut packages = vec![image];
    let mut relationships = vec![relationship("SPDXRef-DOCUMENT", "DESCRIBES", &image_id)];
    let mut refs = LicenceRefs::default();
    let mut sources: BTreeMap<(&str, &str), String> = BTreeMap::new();
    for p in pkgs {
        let id = unique(
            &mut taken,
            &format!(
                "SPDXRef-deb-{}-{}",
                id_string(&p.name),
                id_string(&p.architecture)
            ),
        );
        packages.push(spdx_package(p, id.clone(), meta, &mut refs));
        relationships.push(relationship(&image_id, "CONTAINS", &id));
        let source = sources
            .entry((p.source_name.as_str(), p.source_version.as_str()))
            .or_insert_with(|| {
                let wanted = format!(
                    "SPDXRef-src-{}-{}",
                    id_string(&p.source_name),
                    id_string(&p.source_version)
                );
                unique(&mut taken, &wanted)
            });
        relationships.push(relationship(&id, "GENERATED_FROM", source));
    }
    for ((name, version), id) in &sources {
        let src = SpdxPackage::new(id.clone(), name, version, "SOURCE")
            .purl(deb_purl(name, version, "source", meta));
        packages.push(src);
    }
    let doc = SpdxDocument {
        spdx_version: "SPDX-2.3",
        data_license: "CC0-1.0",
        spdx_id: "SPDXRef-DOCUMENT",
        name: format!("{}-{}", meta.name, meta.version),
        document_namespace: format!(
            "https://stemforge.invalid/spdx/{}-{}-{}",
            id_string(&meta.name),
            id_string(&meta.version),
            document_uuid(meta, "spdx")
        ),
        creation_info: SpdxCreationInfo {
            created: timestamp(meta),
            creators: vec![format!("Tool: stemforge-{}", meta.tool_version)],
        },
        packages,
        relationships,
        has_extracted_licensing_infos: extracted_licences(&refs),
    };
    to_json(&doc)
}

fn spdx_package(p: &Package, id: String, meta: &SbomMeta, refs: &mut LicenceRefs) -> SpdxPackage {
    let purpose = if is_library(p) {
        "LIBRARY"
    } else {
        "APPLICATION"
    };
    let mut s = SpdxPackage::new(id, &p.name, &p.version, purpose).purl(purl(p, meta));
    if let Some((name, email)) = maintainer(p) {
        s.supplier = match email {
            Some(e) => format!("Organization: {name} ({e})"),
            None => format!("Organization: {name}"),
        };
    }
    s.homepage = homepage(p);
    s.source_info = Some(format!(
        "built package from: {} {}",
        p.source_name, p.source_version
    ));
    let licences = declared(p);
    for name in licences.iter().flat_map(other_names) {
        refs.note_user(&name, &p.name);
    }
    s.license_declared = declared_expression(&licences, refs);
    s.summary = non_empty(p.summary.trim());
    if let Some(sha) = &p.sha256 {
        s.checksums.push(SpdxChecksum {
            algorithm: "SHA256",
            checksum_value: sha.clone(),
        });
    }
    s
}

/// The licence names in `l` that are no SPDX id.
fn other_names(l: &Licence) -> Vec<String> {
    match l {
        Licence::Id(_) => Vec::new(),
        Licence::Other(n) => vec![n.clone()],
        Licence::All(v) | Licence::Any(v) => v.iter().flat_map(other_names).collect(),
    }
}

/// One `hasExtractedLicensingInfos` entry per `LicenseRef-` used.
fn extracted_licences(refs: &LicenceRefs) -> Vec<SpdxExtractedLicence> {
    let mut out: Vec<SpdxExtractedLicence> = refs
        .ids
        .iter()
        .map(|(name, id)| {
            let users: Vec<&str> = refs
                .users
                .get(name)
                .into_iter()
                .flatten()
                .map(String::as_str)
                .collect();
            SpdxExtractedLicence {
                license_id: id.clone(),
                extracted_text: format!(
                    "The licence the Debian copyright files call \"{name}\"; its text is in \
                     /usr/share/doc/PACKAGE/copyright of: {}",
                    users.join(", ")
                ),
                name: name.clone(),
            }
        })
        .collect();
    out.sort_by(|a, b| a.license_id.cmp(&b.license_id));
    out
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// `Debian 12 (bookworm)`.
fn os_description(meta: &SbomMeta) -> String {
    let mut distro = meta.distro.clone();
    if let Some(first) = distro.get_mut(..1) {
        first.make_ascii_uppercase();
    }
    format!("{distro} {} ({})", meta.distro_version, meta.codename)
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut out = serde_json::to_vec_pretty(value).context("serializing an SBOM")?;
    out.push(b'\n');
    Ok(out)
}

// ---------------------------------------------------------------------------
// CycloneDX 1.6

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CdxBom {
    bom_format: &'static str,
    spec_version: &'static str,
    serial_number: String,
    version: u32,
    metadata: CdxMetadata,
    components: Vec<CdxComponent>,
    dependencies: Vec<CdxDependency>,
}

#[derive(Serialize)]
struct CdxMetadata {
    timestamp: String,
    tools: CdxTools,
    component: CdxComponent,
}

#[derive(Serialize)]
struct CdxTools {
    components: Vec<CdxComponent>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CdxComponent {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "bom-ref", skip_serializing_if = "Option::is_none")]
    bom_ref: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    supplier: Option<CdxSupplier>,
    name: String,
    version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    hashes: Vec<CdxHash>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    licenses: Vec<CdxLicenceChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purl: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    external_references: Vec<CdxReference>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    properties: Vec<CdxProperty>,
}

#[derive(Serialize)]
struct CdxSupplier {
    name: String,
}

#[derive(Serialize)]
struct CdxHash {
    alg: &'static str,
    content: String,
}

/// A licence entry: one licence (by SPDX id or by name), or the whole
/// SPDX expression when the package's licences are alternatives.
#[derive(Serialize)]
#[serde(untagged)]
enum CdxLicenceChoice {
    License {
        license: CdxLicence,
    },
    Expression {
        expression: String,
        acknowledgement: &'static str,
    },
}

#[derive(Serialize)]
struct CdxLicence {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    acknowledgement: &'static str,
}

#[derive(Serialize)]
struct CdxReference {
    #[serde(rename = "type")]
    kind: &'static str,
    url: String,
}

#[derive(Serialize)]
struct CdxProperty {
    name: &'static str,
    value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CdxDependency {
    #[serde(rename = "ref")]
    reference: String,
    depends_on: Vec<String>,
}

impl CdxComponent {
    fn new(kind: &'static str, name: &str, version: &str) -> CdxComponent {
        CdxComponent {
            kind,
            bom_ref: None,
            supplier: None,
            name: name.to_string(),
            version: version.to_string(),
            description: None,
            hashes: Vec::new(),
            licenses: Vec::new(),
            purl: None,
            external_references: Vec::new(),
            properties: Vec::new(),
        }
    }
}

/// The CycloneDX 1.6 JSON document: the image is the BOM's subject
/// (`metadata.component`, type operating-system) and depends on every
/// package; each package's bom-ref is its purl.
pub fn cyclonedx_json(pkgs: &[Package], meta: &SbomMeta) -> Result<Vec<u8>> {
    let mut image = CdxComponent::new("operating-system", &meta.name, &meta.version);
    let image_ref = format!("stemforge-image:{}@{}", meta.name, meta.version);
    image.bom_ref = Some(image_ref.clone());
    image.description = Some(os_description(meta));
    let mut refs = LicenceRefs::default();
    let components: Vec<CdxComponent> = pkgs
        .iter()
        .map(|p| cdx_component(p, meta, &mut refs))
        .collect();
    let depends_on = components
        .iter()
        .filter_map(|c| c.bom_ref.clone())
        .collect();
    let bom = CdxBom {
        bom_format: "CycloneDX",
        spec_version: "1.6",
        serial_number: format!("urn:uuid:{}", document_uuid(meta, "cyclonedx")),
        version: 1,
        metadata: CdxMetadata {
            timestamp: timestamp(meta),
            tools: CdxTools {
                components: vec![CdxComponent::new(
                    "application",
                    "stemforge",
                    &meta.tool_version,
                )],
            },
            component: image,
        },
        components,
        dependencies: vec![CdxDependency {
            reference: image_ref,
            depends_on,
        }],
    };
    to_json(&bom)
}

fn cdx_component(p: &Package, meta: &SbomMeta, refs: &mut LicenceRefs) -> CdxComponent {
    let kind = if is_library(p) {
        "library"
    } else {
        "application"
    };
    let mut c = CdxComponent::new(kind, &p.name, &p.version);
    let purl = purl(p, meta);
    c.bom_ref = Some(purl.clone());
    c.purl = Some(purl);
    c.supplier = maintainer(p).map(|(name, _)| CdxSupplier { name });
    c.description = non_empty(p.summary.trim());
    if let Some(sha) = &p.sha256 {
        c.hashes.push(CdxHash {
            alg: "SHA-256",
            content: sha.clone(),
        });
    }
    c.licenses = cdx_licences(&declared(p), refs);
    if let Some(url) = homepage(p) {
        c.external_references.push(CdxReference {
            kind: "website",
            url,
        });
    }
    c.properties = vec![
        CdxProperty {
            name: "stemforge:deb:architecture",
            value: p.architecture.clone(),
        },
        CdxProperty {
            name: "stemforge:deb:source",
            value: p.source_name.clone(),
        },
        CdxProperty {
            name: "stemforge:deb:source-version",
            value: p.source_version.clone(),
        },
    ];
    c
}

/// Single licences as `license` entries (by id, or by name when no SPDX
/// id is equivalent); alternatives as one SPDX `expression`.
fn cdx_licences(licences: &[Licence], refs: &mut LicenceRefs) -> Vec<CdxLicenceChoice> {
    if licences.iter().any(Licence::is_compound) {
        return vec![CdxLicenceChoice::Expression {
            expression: declared_expression(licences, refs),
            acknowledgement: "declared",
        }];
    }
    licences
        .iter()
        .map(|l| {
            let (id, name) = match l {
                Licence::Id(id) => (Some(*id), None),
                other => (None, Some(other_names(other).concat())),
            };
            CdxLicenceChoice::License {
                license: CdxLicence {
                    id,
                    name,
                    acknowledgement: "declared",
                },
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// packages.txt

/// The package list BOSH stemcells ship: `dpkg -l` as it prints to a
/// pipe (columns as wide as their longest entry, at least 14, 12, 12 and
/// 33 wide; `NAME:ARCH` for Multi-Arch: same and foreign packages).
pub fn packages_txt(pkgs: &[Package]) -> String {
    let native = native_arch(pkgs);
    let rows: Vec<[String; 4]> = pkgs
        .iter()
        .map(|p| {
            let qualified = p.multi_arch.as_deref() == Some("same")
                || (p.architecture != "all" && Some(p.architecture.as_str()) != native);
            let name = if qualified {
                format!("{}:{}", p.name, p.architecture)
            } else {
                p.name.clone()
            };
            let version = p
                .version
                .strip_prefix("0:")
                .unwrap_or(&p.version)
                .to_string();
            [name, version, p.architecture.clone(), p.summary.clone()]
        })
        .collect();
    let mut widths = [14, 12, 12, 33];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let [nw, vw, aw, dw] = widths;
    let mut out = String::from(
        "Desired=Unknown/Install/Remove/Purge/Hold\n\
         | Status=Not/Inst/Conf-files/Unpacked/halF-conf/Half-inst/trig-aWait/Trig-pend\n\
         |/ Err?=(none)/Reinst-required (Status,Err: uppercase=bad)\n",
    );
    out.push_str(&format!(
        "||/ {:nw$} {:vw$} {:aw$} Description\n",
        "Name", "Version", "Architecture"
    ));
    out.push_str(&format!(
        "+++-{}-{}-{}-{}\n",
        "=".repeat(nw),
        "=".repeat(vw),
        "=".repeat(aw),
        "=".repeat(dw)
    ));
    for (p, [name, version, arch, summary]) in pkgs.iter().zip(&rows) {
        out.push_str(&format!(
            "{} {name:nw$} {version:vw$} {arch:aw$} {summary}\n",
            status_letters(&p.status)
        ));
    }
    out
}

/// dpkg's architecture: that of the dpkg package itself, else the most
/// common architecture other than `all`.
fn native_arch(pkgs: &[Package]) -> Option<&str> {
    if let Some(dpkg) = pkgs.iter().find(|p| p.name == "dpkg") {
        return Some(&dpkg.architecture);
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for p in pkgs.iter().filter(|p| p.architecture != "all") {
        *counts.entry(&p.architecture).or_default() += 1;
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map(|(a, _)| a)
}

/// The three state letters of `dpkg -l` (`ii `) for a `Status:` value.
fn status_letters(status: &str) -> String {
    let words: Vec<&str> = status.split_whitespace().collect();
    let want = match words.first().copied() {
        Some("install") => 'i',
        Some("hold") => 'h',
        Some("deinstall") => 'r',
        Some("purge") => 'p',
        _ => 'u',
    };
    let eflag = if words.get(1) == Some(&"reinstreq") {
        'R'
    } else {
        ' '
    };
    let state = match words.get(2).copied() {
        Some("installed") => 'i',
        Some("config-files") => 'c',
        Some("half-installed") => 'H',
        Some("unpacked") => 'U',
        Some("half-configured") => 'F',
        Some("triggers-awaited") => 'W',
        Some("triggers-pending") => 't',
        _ => 'n',
    };
    format!("{want}{state}{eflag}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::path::PathBuf;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sbom")
    }

    fn fixture_packages() -> Vec<Package> {
        let f = fixture();
        read_packages(&f.join("root"), Some(&f.join("lists"))).unwrap()
    }

    fn meta(distro: &str, version: &str, seed: &str) -> SbomMeta {
        SbomMeta {
            name: "debian-bookworm".into(),
            version: "1.2.3".into(),
            distro: distro.into(),
            distro_version: version.into(),
            codename: "bookworm".into(),
            created: DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            tool_version: "0.1.0".into(),
            namespace_seed: seed.into(),
        }
    }

    fn debian() -> SbomMeta {
        meta("debian", "12", "3f1c0ffee")
    }

    fn find<'a>(pkgs: &'a [Package], name: &str) -> &'a Package {
        pkgs.iter().find(|p| p.name == name).expect(name)
    }

    fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn installed_packages_only_sorted_by_name() {
        let names: Vec<String> = fixture_packages().into_iter().map(|p| p.name).collect();
        // netbase is in state config-files: not installed.
        assert_eq!(
            names,
            [
                "hostname",
                "libbz2-1.0",
                "libcap2",
                "libmpfr6",
                "python3-dev",
                "sensible-utils"
            ]
        );
    }

    #[test]
    fn every_field_of_a_multi_arch_library() {
        let pkgs = fixture_packages();
        let expected = Package {
            name: "libbz2-1.0".into(),
            version: "1.0.8-5+b1".into(),
            architecture: "amd64".into(),
            source_name: "bzip2".into(),
            source_version: "1.0.8-5".into(),
            summary: "high-quality block-sorting file compressor library - runtime".into(),
            homepage: Some("https://sourceware.org/bzip2/".into()),
            maintainer: Some("Anibal Monsalve Salazar <anibal@debian.org>".into()),
            licenses: vec!["BSD-variant".into(), "GPL-2".into()],
            sha256: Some("54149da3f44b22d523b26b692033b84503d822cc5122fed606ea69cc83ca5aeb".into()),
            installed_size_kib: Some(106),
            section: Some("libs".into()),
            multi_arch: Some("same".into()),
            status: "install ok installed".into(),
        };
        assert_eq!(find(&pkgs, "libbz2-1.0"), &expected);
    }

    #[test]
    fn source_names_and_versions() {
        let pkgs = fixture_packages();
        let source = |n| {
            let p = find(&pkgs, n);
            (p.source_name.as_str(), p.source_version.as_str())
        };
        // No Source field: the package is its own source.
        assert_eq!(source("hostname"), ("hostname", "3.23+nmu1"));
        // Source without a version: the binary's version.
        assert_eq!(source("libmpfr6"), ("mpfr4", "4.2.0-1"));
        // Source (version), with an epoch; the binary is a binNMU.
        assert_eq!(source("libcap2"), ("libcap2", "1:2.66-4+deb12u2"));
        assert_eq!(find(&pkgs, "libcap2").version, "1:2.66-4+deb12u2+b2");
        assert_eq!(source("python3-dev"), ("python3-defaults", "3.11.2-1"));
        assert_eq!(find(&pkgs, "sensible-utils").architecture, "all");
        assert_eq!(find(&pkgs, "hostname").homepage, None);
    }

    #[test]
    fn checksums_match_name_version_and_architecture() {
        let pkgs = fixture_packages();
        assert_eq!(
            find(&pkgs, "hostname").sha256.as_deref(),
            Some("17d9a2f3c05004499d80e180d2440fd716f84c32b65f09d96c9a024af4d1d0e7")
        );
        // The index lists libcap2 1:2.66-4+deb12u3+b1, not the installed one.
        assert_eq!(find(&pkgs, "libcap2").sha256, None);
        assert_eq!(find(&pkgs, "libmpfr6").sha256, None);
        let without = read_packages(&fixture().join("root"), None).unwrap();
        assert!(without.iter().all(|p| p.sha256.is_none()));
    }

    #[test]
    fn licences_come_from_machine_readable_copyright_files() {
        let pkgs = fixture_packages();
        let lic = |n| find(&pkgs, n).licenses.clone();
        assert_eq!(lic("hostname"), ["GPL-2"]);
        assert_eq!(
            lic("libcap2"),
            ["BSD-3-clause or GPL-2", "BSD-3-clause or GPL-2+"]
        );
        // Files paragraphs only (not the stand-alone License paragraphs).
        assert_eq!(
            lic("sensible-utils"),
            ["GPL-2+", "All-permissive", "configure", "installsh"]
        );
        // Not DEP-5: nothing asserted.
        assert!(lic("libmpfr6").is_empty());
        // Through the doc directory symlink python3-dev -> python3 (not DEP-5).
        assert!(lic("python3-dev").is_empty());
        let python3 = fixture().join("root/usr/share/doc/python3/copyright");
        assert!(copyright_licenses(&std::fs::read_to_string(python3).unwrap()).is_empty());
    }

    #[test]
    fn copyright_symlinks_resolve_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = root.path();
        let src = fixture().join("root");
        std::fs::create_dir_all(r.join("var/lib/dpkg")).unwrap();
        std::fs::copy(
            src.join("var/lib/dpkg/status"),
            r.join("var/lib/dpkg/status"),
        )
        .unwrap();
        let doc = r.join("usr/share/doc");
        std::fs::create_dir_all(doc.join("libcap2")).unwrap();
        let cap = src.join("usr/share/doc/libcap2/copyright");
        std::fs::copy(&cap, doc.join("libcap2/copyright")).unwrap();
        // An absolute link within the image: /usr/share/doc/libcap2.
        std::os::unix::fs::symlink("/usr/share/doc/libcap2", doc.join("hostname")).unwrap();
        // A link to a host directory outside the root, holding a DEP-5 file.
        std::fs::copy(&cap, outside.path().join("copyright")).unwrap();
        std::os::unix::fs::symlink(outside.path(), doc.join("libmpfr6")).unwrap();
        std::os::unix::fs::symlink("../../../../../..", doc.join("libbz2-1.0")).unwrap();

        let pkgs = read_packages(r, None).unwrap();
        assert_eq!(
            find(&pkgs, "hostname").licenses,
            find(&pkgs, "libcap2").licenses
        );
        assert_eq!(find(&pkgs, "hostname").licenses.len(), 2);
        assert!(find(&pkgs, "libmpfr6").licenses.is_empty());
        assert!(find(&pkgs, "libbz2-1.0").licenses.is_empty());
    }

    #[test]
    fn debian_short_names_map_to_equivalent_spdx_ids() {
        let cases = [
            ("GPL-2+", Some("GPL-2.0-or-later")),
            ("GPL-2", Some("GPL-2.0-only")),
            ("GPL-2.0+", Some("GPL-2.0-or-later")),
            ("GPL-3.0-or-later", Some("GPL-3.0-or-later")),
            ("LGPL-2.1+", Some("LGPL-2.1-or-later")),
            ("LGPL-2+", Some("LGPL-2.0-or-later")),
            ("lgpl-3", Some("LGPL-3.0-only")),
            ("AGPL-3+", Some("AGPL-3.0-or-later")),
            ("GFDL-1.3+", Some("GFDL-1.3-or-later")),
            ("GFDL-NIV-1.2+", Some("GFDL-1.2-no-invariants-or-later")),
            ("BSD-3-clause", Some("BSD-3-Clause")),
            ("BSD-2-clause", Some("BSD-2-Clause")),
            ("Expat", Some("MIT")),
            ("Zlib", Some("Zlib")),
            ("ISC", Some("ISC")),
            ("Apache-2", Some("Apache-2.0")),
            ("Apache-2.0", Some("Apache-2.0")),
            ("MPL-2.0", Some("MPL-2.0")),
            ("CC0-1.0", Some("CC0-1.0")),
            ("public-domain", None),
            ("GPL", None),
            ("LGPL", None),
            ("GPL-9+", None),
            ("BSD-variant", None),
            ("Artistic", None),
            ("GPL-2+ with OpenSSL exception", None),
            ("Autoconf-exception-2.0", None),
        ];
        for (name, id) in cases {
            assert_eq!(spdx_id(name), id, "{name}");
        }
    }

    #[test]
    fn licence_expressions_follow_the_copyright_format() {
        let render = |s: &str| Licence::parse(s).render(&mut LicenceRefs::default());
        assert_eq!(
            render("BSD-3-clause or GPL-2"),
            "BSD-3-Clause OR GPL-2.0-only"
        );
        assert_eq!(
            render("GPL-2+ or LGPL-2.1+ and MIT"),
            "GPL-2.0-or-later OR (LGPL-2.1-or-later AND MIT)"
        );
        assert_eq!(
            render("GPL-2+ or Artistic, and BSD-3-clause"),
            "(GPL-2.0-or-later OR LicenseRef-Artistic) AND BSD-3-Clause"
        );
        assert_eq!(
            render("GPL-3+ with Bison exception"),
            "LicenseRef-GPL-3plus-with-Bison-exception"
        );
        assert_eq!(render("public-domain"), "LicenseRef-public-domain");
        // Not the format's syntax: one licence named by the whole text.
        assert_eq!(render("GPL-2, LGPL"), "LicenseRef-GPL-2--LGPL");
        assert_eq!(render("or GPL-2"), "LicenseRef-or-GPL-2");

        let pkgs = fixture_packages();
        let declared_of =
            |n| declared_expression(&declared(find(&pkgs, n)), &mut LicenceRefs::default());
        assert_eq!(
            declared_of("libcap2"),
            "(BSD-3-Clause OR GPL-2.0-only) AND (BSD-3-Clause OR GPL-2.0-or-later)"
        );
        assert_eq!(
            declared_of("libbz2-1.0"),
            "LicenseRef-BSD-variant AND GPL-2.0-only"
        );
        assert_eq!(declared_of("libmpfr6"), "NOASSERTION");
    }

    #[test]
    fn licence_refs_are_distinct_per_name() {
        let mut refs = LicenceRefs::default();
        assert_eq!(
            refs.id_for("GPL-2+ and more"),
            "LicenseRef-GPL-2plus-and-more"
        );
        assert_eq!(
            refs.id_for("GPL-2+ and more"),
            "LicenseRef-GPL-2plus-and-more"
        );
        // Another name that sanitizes the same gets its own id.
        assert_eq!(
            refs.id_for("GPL-2+_and more"),
            "LicenseRef-GPL-2plus-and-more-2"
        );
    }

    #[test]
    fn embedded_licence_list_is_the_cyclonedx_schemas() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/schemas/cyclonedx/spdx.SNAPSHOT.schema.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let schema: Value = serde_json::from_str(&text).unwrap();
        let all: Vec<&str> = schema["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let ours: Vec<&str> = SPDX_LICENCE_IDS.split_whitespace().collect();
        assert!(ours.len() > 700, "{}", ours.len());
        assert_eq!(ours, all[..ours.len()]);
        // The licences are one run sorted without regard to case; the
        // exceptions (`389-exception`, ...) follow it.
        let lower: Vec<String> = all.iter().map(|s| s.to_ascii_lowercase()).collect();
        assert!(lower[..ours.len()].windows(2).all(|w| w[0] < w[1]));
        assert!(lower[ours.len()] < lower[ours.len() - 1]);
        assert!(all[ours.len()..].contains(&"Classpath-exception-2.0"));
    }

    #[test]
    fn purls_encode_versions_and_name_the_distro() {
        let pkgs = fixture_packages();
        assert_eq!(
            purl(find(&pkgs, "libcap2"), &debian()),
            "pkg:deb/debian/libcap2@1:2.66-4%2Bdeb12u2%2Bb2?arch=amd64&distro=debian-12"
        );
        assert_eq!(
            purl(find(&pkgs, "sensible-utils"), &meta("ubuntu", "24.04", "x")),
            "pkg:deb/ubuntu/sensible-utils@0.0.17%2Bnmu1?arch=all&distro=ubuntu-24.04"
        );
        assert_eq!(purl_escape("libstdc++6"), "libstdc%2B%2B6");
    }

    #[test]
    fn spdx_document_of_the_fixture() {
        let pkgs = fixture_packages();
        let doc = json(&spdx_json(&pkgs, &debian()).unwrap());
        assert_eq!(doc["spdxVersion"], "SPDX-2.3");
        assert_eq!(doc["dataLicense"], "CC0-1.0");
        assert_eq!(doc["name"], "debian-bookworm-1.2.3");
        assert_eq!(doc["creationInfo"]["created"], "2023-11-14T22:13:20Z");
        assert_eq!(doc["creationInfo"]["creators"][0], "Tool: stemforge-0.1.0");
        let ns = doc["documentNamespace"].as_str().unwrap();
        assert!(
            ns.starts_with("https://stemforge.invalid/spdx/debian-bookworm-1.2.3-"),
            "{ns}"
        );

        let packages = doc["packages"].as_array().unwrap();
        let by_id = |id: &str| packages.iter().find(|p| p["SPDXID"] == id).expect(id);
        let image = by_id("SPDXRef-Image");
        assert_eq!(image["primaryPackagePurpose"], "OPERATING-SYSTEM");
        assert_eq!(image["versionInfo"], "1.2.3");

        let bz2 = by_id("SPDXRef-deb-libbz2-1.0-amd64");
        assert_eq!(bz2["name"], "libbz2-1.0");
        assert_eq!(bz2["versionInfo"], "1.0.8-5+b1");
        assert_eq!(
            bz2["supplier"],
            "Organization: Anibal Monsalve Salazar (anibal@debian.org)"
        );
        assert_eq!(bz2["downloadLocation"], "NOASSERTION");
        assert_eq!(bz2["filesAnalyzed"], false);
        assert_eq!(bz2["licenseConcluded"], "NOASSERTION");
        assert_eq!(
            bz2["licenseDeclared"],
            "LicenseRef-BSD-variant AND GPL-2.0-only"
        );
        assert_eq!(bz2["copyrightText"], "NOASSERTION");
        assert_eq!(bz2["homepage"], "https://sourceware.org/bzip2/");
        assert_eq!(bz2["primaryPackagePurpose"], "LIBRARY");
        assert_eq!(bz2["checksums"][0]["algorithm"], "SHA256");
        assert_eq!(
            bz2["checksums"][0]["checksumValue"],
            "54149da3f44b22d523b26b692033b84503d822cc5122fed606ea69cc83ca5aeb"
        );
        let r = &bz2["externalRefs"][0];
        assert_eq!(r["referenceCategory"], "PACKAGE-MANAGER");
        assert_eq!(r["referenceType"], "purl");
        assert_eq!(
            r["referenceLocator"],
            "pkg:deb/debian/libbz2-1.0@1.0.8-5%2Bb1?arch=amd64&distro=debian-12"
        );
        let mpfr = by_id("SPDXRef-deb-libmpfr6-amd64");
        assert_eq!(mpfr["licenseDeclared"], "NOASSERTION");
        assert!(mpfr.get("checksums").is_none());
        assert_eq!(
            by_id("SPDXRef-deb-hostname-amd64")["primaryPackagePurpose"],
            "APPLICATION"
        );
        let src = by_id("SPDXRef-src-bzip2-1.0.8-5");
        assert_eq!(src["primaryPackagePurpose"], "SOURCE");
        assert_eq!(
            src["externalRefs"][0]["referenceLocator"],
            "pkg:deb/debian/bzip2@1.0.8-5?arch=source&distro=debian-12"
        );
        // 1 image + 6 packages + 6 sources (each from another source).
        assert_eq!(packages.len(), 13);

        let rels = doc["relationships"].as_array().unwrap();
        let count = |t: &str| rels.iter().filter(|r| r["relationshipType"] == t).count();
        assert_eq!(
            (
                count("DESCRIBES"),
                count("CONTAINS"),
                count("GENERATED_FROM")
            ),
            (1, 6, 6)
        );
        assert!(
            rels.iter()
                .any(|r| r["spdxElementId"] == "SPDXRef-deb-libbz2-1.0-amd64"
                    && r["relationshipType"] == "GENERATED_FROM"
                    && r["relatedSpdxElement"] == "SPDXRef-src-bzip2-1.0.8-5")
        );

        // Every LicenseRef used is defined, and only those.
        let extracted = doc["hasExtractedLicensingInfos"].as_array().unwrap();
        let defined: BTreeSet<&str> = extracted
            .iter()
            .map(|e| e["licenseId"].as_str().unwrap())
            .collect();
        let used: BTreeSet<&str> = packages
            .iter()
            .flat_map(|p| {
                p["licenseDeclared"]
                    .as_str()
                    .unwrap()
                    .split([' ', '(', ')'])
            })
            .filter(|w| w.starts_with("LicenseRef-"))
            .collect();
        assert_eq!(
            defined,
            BTreeSet::from([
                "LicenseRef-All-permissive",
                "LicenseRef-BSD-variant",
                "LicenseRef-configure",
                "LicenseRef-installsh"
            ])
        );
        assert_eq!(defined, used);
        let variant = extracted
            .iter()
            .find(|e| e["name"] == "BSD-variant")
            .unwrap();
        assert!(
            variant["extractedText"]
                .as_str()
                .unwrap()
                .ends_with(": libbz2-1.0")
        );
    }

    #[test]
    fn cyclonedx_document_of_the_fixture() {
        let pkgs = fixture_packages();
        let bom = json(&cyclonedx_json(&pkgs, &debian()).unwrap());
        assert_eq!(bom["bomFormat"], "CycloneDX");
        assert_eq!(bom["specVersion"], "1.6");
        assert_eq!(bom["version"], 1);
        let serial = bom["serialNumber"].as_str().unwrap();
        let uuid = uuid::Uuid::parse_str(serial.strip_prefix("urn:uuid:").unwrap()).unwrap();
        assert_eq!(uuid.get_version_num(), 5);
        assert_eq!(bom["metadata"]["timestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(
            bom["metadata"]["tools"]["components"][0]["name"],
            "stemforge"
        );
        let image = &bom["metadata"]["component"];
        assert_eq!(image["type"], "operating-system");
        assert_eq!(image["name"], "debian-bookworm");
        assert_eq!(image["description"], "Debian 12 (bookworm)");

        let components = bom["components"].as_array().unwrap();
        assert_eq!(components.len(), 6);
        let by_name = |n: &str| components.iter().find(|c| c["name"] == n).expect(n);
        let bz2 = by_name("libbz2-1.0");
        let purl = "pkg:deb/debian/libbz2-1.0@1.0.8-5%2Bb1?arch=amd64&distro=debian-12";
        assert_eq!(bz2["type"], "library");
        assert_eq!(bz2["bom-ref"], purl);
        assert_eq!(bz2["purl"], purl);
        assert_eq!(bz2["version"], "1.0.8-5+b1");
        assert_eq!(bz2["supplier"]["name"], "Anibal Monsalve Salazar");
        assert_eq!(bz2["hashes"][0]["alg"], "SHA-256");
        assert_eq!(
            bz2["hashes"][0]["content"],
            "54149da3f44b22d523b26b692033b84503d822cc5122fed606ea69cc83ca5aeb"
        );
        assert_eq!(bz2["licenses"][0]["license"]["name"], "BSD-variant");
        assert_eq!(bz2["licenses"][1]["license"]["id"], "GPL-2.0-only");
        assert_eq!(
            bz2["externalReferences"][0]["url"],
            "https://sourceware.org/bzip2/"
        );
        let props: Vec<(&str, &str)> = bz2["properties"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["name"].as_str().unwrap(), p["value"].as_str().unwrap()))
            .collect();
        assert!(props.contains(&("stemforge:deb:source", "bzip2")));
        assert!(props.contains(&("stemforge:deb:source-version", "1.0.8-5")));
        assert!(props.contains(&("stemforge:deb:architecture", "amd64")));
        assert_eq!(
            by_name("libcap2")["licenses"][0]["expression"],
            "(BSD-3-Clause OR GPL-2.0-only) AND (BSD-3-Clause OR GPL-2.0-or-later)"
        );
        assert!(by_name("libmpfr6").get("licenses").is_none());
        assert!(by_name("libcap2").get("hashes").is_none());
        assert_eq!(by_name("hostname")["type"], "application");

        let deps = &bom["dependencies"][0];
        assert_eq!(deps["ref"], image["bom-ref"]);
        assert_eq!(deps["dependsOn"].as_array().unwrap().len(), 6);
    }

    #[test]
    fn documents_depend_only_on_their_inputs() {
        let pkgs = fixture_packages();
        let m = debian();
        assert_eq!(spdx_json(&pkgs, &m).unwrap(), spdx_json(&pkgs, &m).unwrap());
        assert_eq!(
            cyclonedx_json(&pkgs, &m).unwrap(),
            cyclonedx_json(&pkgs, &m).unwrap()
        );
        let other = meta("debian", "12", "another-seed");
        let ns = |m: &SbomMeta| json(&spdx_json(&pkgs, m).unwrap())["documentNamespace"].clone();
        let serial =
            |m: &SbomMeta| json(&cyclonedx_json(&pkgs, m).unwrap())["serialNumber"].clone();
        assert_ne!(ns(&m), ns(&other));
        assert_ne!(serial(&m), serial(&other));
        // The stanza order of the database does not matter.
        let mut reversed = pkgs.clone();
        reversed.reverse();
        let mut shuffled = parse_status(
            &std::fs::read_to_string(fixture().join("root/var/lib/dpkg/status")).unwrap(),
        )
        .unwrap();
        assert_ne!(
            shuffled.iter().map(|p| &p.name).collect::<Vec<_>>(),
            pkgs.iter().map(|p| &p.name).collect::<Vec<_>>()
        );
        shuffled.sort_by(|a, b| (&a.name, &a.architecture).cmp(&(&b.name, &b.architecture)));
        assert_eq!(
            shuffled.iter().map(|p| &p.name).collect::<Vec<_>>(),
            pkgs.iter().map(|p| &p.name).collect::<Vec<_>>()
        );
    }

    #[test]
    fn packages_txt_is_what_dpkg_l_prints() {
        // dpkg-l.txt is dpkg's own output for the fixture database; it also
        // lists the config-files package, which is not installed.
        let dpkg = std::fs::read_to_string(fixture().join("dpkg-l.txt")).unwrap();
        let installed: String = dpkg
            .lines()
            .filter(|l| !l.starts_with("rc "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(packages_txt(&fixture_packages()), installed);
    }

    #[test]
    fn dpkg_l_letters() {
        assert_eq!(status_letters("install ok installed"), "ii ");
        assert_eq!(status_letters("hold ok installed"), "hi ");
        assert_eq!(status_letters("install reinstreq half-installed"), "iHR");
        assert_eq!(status_letters("deinstall ok config-files"), "rc ");
    }
}
