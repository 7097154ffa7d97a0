//! The command line: clap definitions and dispatch. Exit codes: 0 success,
//! 1 findings (the scan or the verification failed), 2 errors (bad input,
//! a failed preflight or step).

use crate::benchmarks;
use crate::config::ConfigError;
use crate::pipeline::{self, BuildOptions, PreflightError};
use crate::profile::{self, DEFAULT_PROFILE, ProfileSource};
use crate::progress;
use crate::scan::{self, Benchmark, ScanContext, Selection, target::Target};
use crate::stage::{Catalog, StageSource};
use crate::verify::{self, Accel, VerifyOptions};
use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "stemforge",
    version,
    about = "Build hardened, stemcell-style OS images and prove them",
    long_about = "Build hardened, stemcell-style OS images and prove them.\n\n\
        stemforge bootstraps a minimal root file system, applies the hardening\n\
        stages, lays the tree out on a GPT disk with separate partitions,\n\
        writes raw and qcow2 images, boots the result under QEMU + OVMF and\n\
        runs its compliance scanner inside. The scanner also audits a root\n\
        tree or the live host.",
    max_term_width = 80
)]
pub struct Cli {
    /// Show every command line that runs
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// Print only results and errors
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build an image: bootstrap, harden, lay out, package, verify
    Build(Box<BuildArgs>),
    /// Build profiles x roles x formats, N at a time over one cache, and
    /// print one table (each cell is the `build` a CI job runs)
    Matrix(Box<MatrixArgs>),
    /// Manage the cache: list, size, prune, export and import entries
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Boot an image under QEMU and run the compliance scan inside it
    Verify(VerifyArgs),
    /// Boot an image under QEMU for a person: prints the ssh command
    Boot(BootArgs),
    /// Scan a root tree or the live host against the controls
    Scan(ScanArgs),
    /// Prove each control on a hardened tree: it passes, and fails once
    /// its break recipe is applied (the tree is put back after each)
    Prove(ProveArgs),
    /// List the OS profiles
    Profiles(ListArgs),
    /// List every control with its references, applicability and break recipe
    Controls(ControlsArgs),
    /// Show how the catalog covers a reference document, item by item
    Coverage(CoverageArgs),
    /// Compare two scan reports: regressions, fixes, new and removed
    /// controls, waiver changes (exit 1 on a regression)
    Diff(DiffArgs),
    /// Print the JSON Schema of `scan --format json`
    Schema,
    /// List the hardening stages and their controls
    Stages(StagesArgs),
    /// The in-image verification agent (started by the image itself)
    #[command(hide = true)]
    Agent,
    /// Sleep SECONDS: the process of the docker role's probe containers
    #[command(hide = true)]
    Idle { seconds: u64 },
}

/// What `scan` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Text,
    Json,
    Junit,
    Ckl,
    Cklb,
    Html,
    Sarif,
}

impl ReportFormat {
    /// The file name in a report directory.
    fn file_name(self) -> &'static str {
        match self {
            ReportFormat::Text => "scan.txt",
            ReportFormat::Json => "scan.json",
            ReportFormat::Junit => "scan.junit.xml",
            ReportFormat::Ckl => "scan.ckl",
            ReportFormat::Cklb => "scan.cklb",
            ReportFormat::Html => "scan.html",
            ReportFormat::Sarif => "scan.sarif",
        }
    }

    fn render(self, r: &scan::Report, verbose: bool) -> String {
        match self {
            ReportFormat::Text => scan::report::render_text(r, verbose),
            ReportFormat::Json => scan::report::render_json(r),
            ReportFormat::Junit => scan::junit::render(r),
            ReportFormat::Ckl => scan::checklist::render_ckl(r),
            ReportFormat::Cklb => scan::checklist::render_cklb(r),
            ReportFormat::Html => scan::html::render(r),
            ReportFormat::Sarif => scan::sarif::render(r),
        }
    }
}

/// When `build --verify` boots the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerifyWhen {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct Sources {
    /// Profiles directory instead of the built-in profiles
    #[arg(long, value_name = "DIR")]
    pub profiles_dir: Option<PathBuf>,
    /// Stages directory instead of the built-in catalog
    #[arg(long, value_name = "DIR")]
    pub stages: Option<PathBuf>,
}

/// A directory given on the command line, or the compiled-in set.
fn profile_source(dir: &Option<PathBuf>) -> ProfileSource {
    dir.clone()
        .map_or(ProfileSource::Embedded, ProfileSource::Dir)
}

fn stage_source(dir: &Option<PathBuf>) -> StageSource {
    dir.clone().map_or(StageSource::Embedded, StageSource::Dir)
}

#[derive(Debug, Args)]
pub struct VmArgs {
    /// UEFI firmware as CODE[,VARS] (default: QEMU's descriptors, distro
    /// paths, then a verified download)
    #[arg(long, value_name = "CODE[,VARS]")]
    pub firmware: Option<String>,
    /// Accelerator; auto uses KVM only when a probe shows it runs a guest
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Seconds the guest gets to boot and report (default: qemu/verify.yml)
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// VM definition instead of the built-in qemu/verify.yml
    #[arg(long, value_name = "FILE")]
    pub vm: Option<PathBuf>,
    /// Cache for downloaded firmware and bootstrapped trees
    #[arg(long, value_name = "DIR", env = "STEMFORGE_CACHE_DIR", default_value_os_t = crate::cache::default_dir())]
    pub cache_dir: PathBuf,
}

impl VmArgs {
    fn choice(&self) -> verify::VmChoice {
        verify::VmChoice {
            firmware: self.firmware.clone(),
            accel: self.accel,
            vm_def: self.vm.clone(),
            cache_dir: self.cache_dir.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// OS profile: a name (see `stemforge profiles`) or a YAML file
    #[arg(short, long, default_value = DEFAULT_PROFILE)]
    pub profile: String,
    #[command(flatten)]
    pub sources: Sources,
    /// Archive mirror for the profile's suites (e.g. a local mirror)
    #[arg(long, value_name = "URL")]
    pub mirror: Option<String>,
    /// Mirror for one suite, e.g. bookworm-security=http://m/debian-security
    #[arg(long = "suite-mirror", value_name = "SUITE=URL")]
    pub suite_mirrors: Vec<String>,
    /// Output directory
    #[arg(short, long, value_name = "DIR", default_value = "out")]
    pub out: PathBuf,
    /// Base name of the outputs (default: the profile's name)
    #[arg(long)]
    pub name: Option<String>,
    /// Outputs to write, comma-separated (default: the profile's): raw,
    /// qcow2, vmdk, ova, aws, openstack, sbom, stemcell-aws,
    /// stemcell-vsphere, stemcell-openstack; groups: stemcells, all
    #[arg(long = "format", value_name = "FORMATS")]
    pub formats: Vec<String>,
    /// The image's version (stemcells, SBOMs, OVF); default: the UTC date
    /// of SOURCE_DATE_EPOCH (or today) as YYYYMMDD
    #[arg(long, value_name = "VERSION")]
    pub image_version: Option<String>,
    /// Boot and scan the image: auto reuses the verdict of an earlier boot
    /// of a bit-for-bit equal disk (kept in the cache) and says so; always
    /// boots; never does not verify
    #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
    pub verify: VerifyWhen,
    /// Do not boot and scan the image (--verify never)
    #[arg(long)]
    pub no_verify: bool,
    /// Make every layer, the disk and the formats afresh in the work
    /// directory, neither reusing nor keeping cached ones (the bootstrap
    /// is still shared)
    #[arg(long)]
    pub no_layer_cache: bool,
    /// Print the full plan and exit (no network, no root needed)
    #[arg(long)]
    pub dry_run: bool,
    /// Keep the work directory, with a copy of the hardened tree, as
    /// OUT/.work/NAME (the tree: OUT/.work/NAME/tree)
    #[arg(long)]
    pub keep_work: bool,
    /// The stemforge binary to put into the image (default: this one)
    #[arg(long, value_name = "FILE")]
    pub agent_binary: Option<PathBuf>,
    /// A BOSH agent binary to install as /var/vcap/bosh/bin/bosh-agent,
    /// started at boot (stemcells without one say so in stemcell.MF)
    #[arg(long, value_name = "FILE")]
    pub bosh_agent: Option<PathBuf>,
    /// A role's input, NAME=FILE (repeatable): kubelet=FILE (k8s-node),
    /// daemon.json=FILE (docker), postgresql.conf=FILE (postgres)
    #[arg(long = "role-input", value_name = "NAME=FILE", value_parser = crate::roles::parse_flag)]
    pub role_inputs: Vec<(String, PathBuf)>,
    /// Build a second time from the same inputs (into OUT/.reproduce, no
    /// verify) and compare every output's sha256; names the first
    /// difference and writes NAME.reproducible.json (exit 1 if any differ)
    #[arg(long)]
    pub check_reproducible: bool,
    /// Print the result as JSON on stdout
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub vm: VmArgs,
}

#[derive(Debug, Args)]
pub struct MatrixArgs {
    /// Profiles (OS images), comma-separated or repeated
    #[arg(long, value_name = "NAMES", required = true)]
    pub profiles: Vec<String>,
    /// Roles: base (none) or a role name, e.g. base,docker,postgres
    #[arg(long, value_name = "NAMES", default_value = "base")]
    pub roles: Vec<String>,
    /// One cell per word: a --format word of `build`, or a family
    /// (vsphere: vmdk+ova, kvm: qcow2+openstack)
    #[arg(long, value_name = "WORDS", required = true)]
    pub formats: Vec<String>,
    /// Cells built at once
    #[arg(short, long, value_name = "N", default_value_t = 1)]
    pub jobs: usize,
    /// Output directory: each cell writes to OUT/NAME/FORMAT
    #[arg(short, long, value_name = "DIR", default_value = "matrix")]
    pub out: PathBuf,
    /// When cells boot their images (see `build --verify`)
    #[arg(long, value_enum, value_name = "WHEN", default_value = "auto")]
    pub verify: VerifyWhen,
    /// One JUnit report of every cell's build, boots and controls
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Print the cells' commands and exit
    #[arg(long)]
    pub list: bool,
    /// The table, or JSON (a machine reads it)
    #[arg(long, value_enum, default_value = "text")]
    pub format: OutputFormat,
    /// Profiles directory instead of the built-in profiles
    #[arg(long, value_name = "DIR")]
    pub profiles_dir: Option<PathBuf>,
    #[command(flatten)]
    pub vm: VmArgs,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List the entries: kind, key, last use, size, what each holds
    Ls(CacheArgs),
    /// Size of the cache, per kind
    Du(CacheArgs),
    /// Remove entries: beyond the newest N of each kind (layers: the
    /// chains of N images), or unused for a while; builds' entries stay
    Prune {
        /// Keep the N most recently used entries of each kind
        #[arg(long, value_name = "N")]
        keep: Option<usize>,
        /// Remove entries unused for this long: 7d, 12h, 30m
        #[arg(long, value_name = "AGE", value_parser = crate::cachectl::parse_age)]
        older_than: Option<std::time::Duration>,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Write every entry as DIR/KIND/KEY.tar with an index of their
    /// SHA-256 (a directory a CI system can save and restore)
    Export {
        dir: PathBuf,
        /// The kinds to write, comma-separated (disks and formats are
        /// quick to remake but large to carry)
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "bootstrap,layers,verdicts"
        )]
        kinds: Vec<String>,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Add the entries of an export directory whose archives match the
    /// index's SHA-256 (damaged ones are skipped and named)
    Import {
        dir: PathBuf,
        #[command(flatten)]
        cache: CacheArgs,
    },
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    /// The cache directory
    #[arg(long, value_name = "DIR", env = "STEMFORGE_CACHE_DIR", default_value_os_t = crate::cache::default_dir())]
    pub cache_dir: PathBuf,
    /// Text, or JSON (ls, du, prune, import)
    #[arg(long, value_enum, default_value = "text")]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct BootArgs {
    /// The image (raw, qcow2 or vmdk)
    pub image: PathBuf,
    /// The hardware to boot it on (default: vsphere for a .vmdk, else kvm)
    #[arg(long, value_enum, value_name = "CLOUD")]
    pub boot_as: Option<verify::BootAs>,
    /// The firmware: uefi, secure-boot (OVMF enforcing it, Microsoft's keys)
    /// or bios (SeaBIOS)
    #[arg(long, value_enum, value_name = "FIRMWARE", default_value = "uefi")]
    pub boot_firmware: verify::BootFirmware,
    /// Where the guest's serial console goes (default: IMAGE.boot.log)
    #[arg(long, value_name = "FILE")]
    pub console: Option<PathBuf>,
    #[command(flatten)]
    pub vm: VmArgs,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The image (raw, qcow2 or vmdk)
    pub image: PathBuf,
    /// The hardware to boot it on (default: vsphere for a .vmdk, else kvm)
    #[arg(long, value_enum, value_name = "CLOUD")]
    pub boot_as: Option<verify::BootAs>,
    /// The firmware: uefi, secure-boot (OVMF enforcing it, Microsoft's keys)
    /// or bios (SeaBIOS)
    #[arg(long, value_enum, value_name = "FIRMWARE", default_value = "uefi")]
    pub boot_firmware: verify::BootFirmware,
    /// Where the console log and reports go (default: beside the image)
    #[arg(short, long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print the verdict as JSON on stdout
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub vm: VmArgs,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["root", "image", "live"])))]
pub struct ScanArgs {
    /// Scan the root tree at DIR (symlinks resolved inside it)
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Scan a disk image file (raw, qcow2, VMDK) without mounting it
    #[arg(long, value_name = "FILE")]
    pub image: Option<PathBuf>,
    /// Scan the running system
    #[arg(long)]
    pub live: bool,
    /// Report format (repeatable with --report-dir): text, json, junit,
    /// ckl (STIG Viewer 2), cklb (STIG Viewer 3), html, sarif
    #[arg(long, value_enum)]
    pub format: Vec<ReportFormat>,
    /// Write the report to FILE instead of stdout (one format)
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Write every report format (or those given) into DIR as scan.json,
    /// scan.junit.xml, scan.ckl, scan.cklb, scan.html, scan.sarif
    #[arg(long, value_name = "DIR", conflicts_with = "output")]
    pub report_dir: Option<PathBuf>,
    /// Waivers (YAML): failing controls they name report `waived`
    #[arg(long, value_name = "FILE")]
    pub waivers: Option<PathBuf>,
    #[command(flatten)]
    pub select: SelectArgs,
    /// Only the controls that answer this benchmark
    #[arg(long, value_enum, default_value_t = Benchmark::All)]
    pub benchmark: Benchmark,
}

#[derive(Debug, Args)]
pub struct ControlsArgs {
    /// Stages directory instead of the built-in catalog
    #[arg(long, value_name = "DIR")]
    pub stages: Option<PathBuf>,
    /// Only the controls that answer this benchmark
    #[arg(long, value_enum, default_value_t = Benchmark::All)]
    pub benchmark: Benchmark,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// The earlier scan (`scan --format json`)
    pub old: PathBuf,
    /// The later scan
    pub new: PathBuf,
    #[arg(long, value_enum, default_value_t = DiffFormat::Text)]
    pub format: DiffFormat,
    /// Write to FILE instead of stdout
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiffFormat {
    Text,
    Json,
    Junit,
}

#[derive(Debug, Args)]
pub struct CoverageArgs {
    /// The reference document: faq, stig-ubuntu2204, stig-ubuntu2404,
    /// cis-ubuntu2204, cis-ubuntu2404, or a role's: docker, postgres,
    /// kubernetes, mke
    #[arg(long, value_name = "SOURCE", default_value = "faq",
          value_parser = clap::builder::PossibleValuesParser::new(benchmarks::SOURCES))]
    pub source: String,
    /// Stages directory instead of the built-in catalog
    #[arg(long, value_name = "DIR")]
    pub stages: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

/// Which catalog, which controls, which roles: `scan` and `prove`.
#[derive(Debug, Args)]
pub struct SelectArgs {
    /// Stages directory instead of the built-in catalog
    #[arg(long, value_name = "DIR")]
    pub stages: Option<PathBuf>,
    /// Roles of the target (default: from /etc/stemforge/image.json)
    #[arg(long = "role", value_name = "ROLE")]
    pub roles: Vec<String>,
    /// Only these controls
    #[arg(long = "control", value_name = "ID")]
    pub controls: Vec<String>,
}

impl SelectArgs {
    /// The catalog, with every `--control` checked to be in it.
    fn catalog(&self) -> Result<Catalog> {
        let catalog = Catalog::load(&stage_source(&self.stages))?;
        for id in &self.controls {
            if !catalog.controls().any(|(_, c)| &c.id == id) {
                return Err(ConfigError::new(
                    "--control",
                    format!("no control `{id}` (see `stemforge controls`)"),
                )
                .into());
            }
        }
        Ok(catalog)
    }

    fn roles(&self) -> Option<Vec<String>> {
        (!self.roles.is_empty()).then(|| self.roles.clone())
    }
}

#[derive(Debug, Args)]
pub struct ProveArgs {
    /// The hardened root tree (changed and restored, one control at a time)
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    #[command(flatten)]
    pub select: SelectArgs,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Profiles directory instead of the built-in profiles
    #[arg(long, value_name = "DIR")]
    pub profiles_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

#[derive(Debug, Args)]
pub struct StagesArgs {
    /// Stages directory instead of the built-in catalog
    #[arg(long, value_name = "DIR")]
    pub stages: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

/// Parse the command line, run, and return the exit code.
pub fn main() -> i32 {
    // Output piped into `head` or `grep -q` ends the process quietly, as
    // with other Unix tools, rather than as a panic on a broken pipe.
    // SAFETY: setting a signal's disposition to its default is sound
    // before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    progress::init(cli.verbose, cli.quiet);
    match run(cli) {
        Ok(code) => code,
        Err(_) if crate::interrupt::signal().is_some() => {
            let i = crate::interrupt::interrupted().expect("interrupted");
            eprintln!(
                "error: {i}: the build stopped; its work tree and half-written outputs are removed"
            );
            128 + i.signal
        }
        Err(e) => {
            eprintln!("error: {}", render_error(&e));
            2
        }
    }
}

/// An error as the user should read it: configuration and preflight
/// problems as they are, others with their chain of context.
fn render_error(e: &anyhow::Error) -> String {
    if let Some(c) = e.downcast_ref::<ConfigError>() {
        return c.to_string();
    }
    if let Some(p) = e.downcast_ref::<PreflightError>() {
        return p.to_string();
    }
    let text = format!("{e:#}");
    let full = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
    }) || text.contains("No space left on device")
        || text.starts_with("disk full: ");
    if full {
        return format!(
            "{text}\n  the disk is full: free space where the path above lives, or build with --out or --cache-dir elsewhere (the cache and earlier outputs are untouched)"
        );
    }
    text
}

fn run(cli: Cli) -> Result<i32> {
    let verbose = cli.verbose;
    match cli.command {
        Command::Build(a) => build(*a),
        Command::Matrix(a) => matrix_cmd(*a),
        Command::Cache(c) => cache_cmd(c),
        Command::Verify(a) => verify_cmd(a),
        Command::Boot(a) => boot_cmd(a),
        Command::Scan(a) => scan_cmd(a, verbose),
        Command::Prove(a) => prove_cmd(a),
        Command::Controls(a) => controls_cmd(a),
        Command::Coverage(a) => coverage_cmd(a),
        Command::Diff(a) => diff_cmd(a),
        Command::Schema => {
            let schema = schemars::schema_for!(scan::Report);
            println!("{}", serde_json::to_string_pretty(&schema)?);
            Ok(0)
        }
        Command::Profiles(a) => profiles(a),
        Command::Stages(a) => stages(a),
        Command::Agent => {
            verify::run_agent()?;
            Ok(0)
        }
        Command::Idle { seconds } => {
            std::thread::sleep(std::time::Duration::from_secs(seconds));
            Ok(0)
        }
    }
}

fn build(a: BuildArgs) -> Result<i32> {
    pipeline::check_out_dir(&a.out)?;
    crate::interrupt::install()?;
    let o = BuildOptions {
        profile: a.profile,
        profiles: profile_source(&a.sources.profiles_dir),
        stages: stage_source(&a.sources.stages),
        mirror: a.mirror,
        suite_mirrors: a.suite_mirrors,
        out_dir: a.out,
        name: a.name,
        formats: (!a.formats.is_empty()).then_some(a.formats),
        image_version: a.image_version,
        verify: !a.no_verify && a.verify != VerifyWhen::Never,
        reverify: a.verify == VerifyWhen::Always,
        layer_cache: !a.no_layer_cache,
        dry_run: a.dry_run,
        cache_dir: a.vm.cache_dir,
        keep_work: a.keep_work,
        firmware: a.vm.firmware,
        accel: a.vm.accel,
        timeout: a.vm.timeout,
        vm_def: a.vm.vm,
        agent_binary: a.agent_binary,
        bosh_agent: a.bosh_agent,
        role_inputs: a.role_inputs,
        source_date_epoch: None,
    };
    let (built, repro) = if a.check_reproducible && !o.dry_run {
        let (b, r) = crate::reproducible::check(&o)?;
        (b, Some(r))
    } else {
        let Some(built) = pipeline::build(&o)? else {
            return Ok(0);
        };
        (built, None)
    };
    let reproducible = repro.as_ref().is_none_or(|r| r.reproducible);
    if a.json {
        let v = serde_json::json!({
            "passed": built.passed(),
            "name": built.plan.name,
            "artifacts": built.artifacts,
            "offline_scan": built.offline.summary,
            "verify": built.verdicts,
            "steps": built.steps.to_json(),
            "reproducible": repro,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for art in &built.artifacts {
            println!(
                "{}  {}",
                art.path.display(),
                crate::config::format_size(art.disk_usage)
            );
        }
        for v in &built.verdicts {
            print_verdict(v);
        }
        if let Some(r) = &repro {
            print!("{}", r.render());
        }
    }
    Ok(if built.passed() && reproducible { 0 } else { 1 })
}

fn matrix_cmd(a: MatrixArgs) -> Result<i32> {
    use crate::matrix;
    let mut build_args = vec![
        "--verify".to_string(),
        format!("{:?}", a.verify).to_lowercase(),
        "--accel".to_string(),
        format!("{:?}", a.vm.accel).to_lowercase(),
        "--cache-dir".to_string(),
        a.vm.cache_dir.display().to_string(),
    ];
    if let Some(t) = a.vm.timeout {
        build_args.extend(["--timeout".to_string(), t.to_string()]);
    }
    if let Some(f) = &a.vm.firmware {
        build_args.extend(["--firmware".to_string(), f.clone()]);
    }
    if let Some(v) = &a.vm.vm {
        build_args.extend(["--vm".to_string(), v.display().to_string()]);
    }
    if let Some(d) = &a.profiles_dir {
        build_args.extend(["--profiles-dir".to_string(), d.display().to_string()]);
    }
    let o = matrix::MatrixOptions {
        profiles: a.profiles,
        roles: a.roles,
        formats: a.formats,
        jobs: a.jobs,
        out: a.out,
        profiles_source: profile_source(&a.profiles_dir),
        build_args,
    };
    let cells = matrix::cells(&o)?;
    if a.list {
        match a.format {
            OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&cells)?),
            OutputFormat::Text => {
                for c in &cells {
                    println!("{}", c.command.join(" "));
                }
            }
        }
        return Ok(0);
    }
    crate::interrupt::install()?;
    let t0 = std::time::Instant::now();
    let outcomes = matrix::run(&cells, o.jobs);
    let wall = t0.elapsed().as_secs_f64();
    if let Some(f) = &a.junit {
        crate::fsutil::write_atomic(f, matrix::junit(&outcomes).as_bytes())?;
    }
    match a.format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "seconds": wall,
                "cells": outcomes,
            }))?
        ),
        OutputFormat::Text => print!("{}", matrix::render(&outcomes, wall)),
    }
    crate::interrupt::check()?;
    Ok(if outcomes.iter().all(|o| o.passed()) {
        0
    } else {
        1
    })
}

fn cache_cmd(c: CacheCommand) -> Result<i32> {
    use crate::cachectl;
    let cache = |a: &CacheArgs| crate::cache::Cache::new(&a.cache_dir);
    let print = |format: OutputFormat, json: serde_json::Value, text: String| -> Result<()> {
        match format {
            OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&json)?),
            OutputFormat::Text => print!("{text}"),
        }
        Ok(())
    };
    match c {
        CacheCommand::Ls(a) => {
            let e = cachectl::entries(&cache(&a), true)?;
            print(a.format, serde_json::to_value(&e)?, cachectl::render_ls(&e))?;
        }
        CacheCommand::Du(a) => {
            let e = cachectl::entries(&cache(&a), true)?;
            let t = cachectl::totals(&e);
            let json: Vec<_> = t
                .iter()
                .map(|(k, n, b)| serde_json::json!({"kind": k, "entries": n, "bytes": b}))
                .collect();
            print(a.format, serde_json::json!(json), cachectl::render_du(&t))?;
        }
        CacheCommand::Prune {
            keep,
            older_than,
            cache: a,
        } => {
            if keep.is_none() && older_than.is_none() {
                return Err(ConfigError::new(
                    "cache prune",
                    "say what to remove: --keep N, --older-than AGE, or both",
                )
                .into());
            }
            let removed = cachectl::prune(&cache(&a), keep, older_than)?;
            let text = removed
                .iter()
                .map(|e| format!("removed {} {} {}\n", e.kind, e.key, e.about))
                .collect::<String>()
                + &format!("{} entries removed\n", removed.len());
            print(a.format, serde_json::to_value(&removed)?, text)?;
        }
        CacheCommand::Export {
            dir,
            kinds,
            cache: a,
        } => {
            let (written, kept) = cachectl::export(&cache(&a), &dir, &kinds)?;
            println!(
                "{} entries in {}: {written} written, {kept} unchanged",
                written + kept,
                dir.display()
            );
        }
        CacheCommand::Import { dir, cache: a } => {
            let r = cachectl::import(&cache(&a), &dir)?;
            let mut text = format!(
                "{} added, {} already present, {} rejected\n",
                r.added.len(),
                r.present.len(),
                r.rejected.len()
            );
            for (n, why) in &r.rejected {
                text.push_str(&format!("rejected {n}: {why}\n"));
            }
            print(a.format, serde_json::to_value(&r)?, text)?;
            if !r.rejected.is_empty() {
                return Ok(1);
            }
        }
    }
    Ok(0)
}

fn print_verdict(v: &verify::Verdict) {
    let how = format!("{:?}, {}", v.boot_as, v.boot_firmware.name());
    if v.passed {
        let scan = v.agent.as_ref().map(|a| &a.scan.summary);
        println!(
            "verify ({how}): PASSED ({}; booted in {:.0} s; logged in over SSH; {} controls pass live, {} not applicable)",
            v.accel,
            v.boot_seconds.unwrap_or(0.0),
            scan.map(|s| s.pass).unwrap_or(0),
            scan.map(|s| s.not_applicable).unwrap_or(0)
        );
        if let Some(r) = &v.reused {
            let when = chrono::DateTime::from_timestamp(r.verified_at, 0)
                .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
                .unwrap_or_default();
            println!(
                "  verdict reused: the disk (sha256 {}) is bit for bit the one booted {when}; --verify always boots again",
                &r.disk_sha256[..16.min(r.disk_sha256.len())]
            );
        }
        if let Some(a) = &v.agent {
            if let Some(t) = &a.boot_time {
                println!("  {t}");
            }
            let slow: Vec<String> = a
                .slowest_units
                .iter()
                .take(5)
                .map(|(u, s)| format!("{u} {s:.1} s"))
                .collect();
            if !slow.is_empty() {
                println!("  slowest units: {}", slow.join(", "));
            }
        }
    } else {
        println!("verify ({how}): FAILED ({})", v.accel);
        for p in &v.problems {
            println!("  - {p}");
        }
        println!("  console log: {}", v.console_log.display());
    }
    for p in v.agent.iter().flat_map(|a| &a.role_proofs) {
        let state = match (&p.skipped, p.passed) {
            (Some(why), _) => format!("NOT RUN: {why}"),
            (None, true) => "proven".to_string(),
            (None, false) => "FAILED".to_string(),
        };
        println!("  role {}: {}: {state}", p.role, p.name);
    }
}

/// `--boot-as`, or the hardware an image's file name suggests.
fn boot_as(given: Option<verify::BootAs>, image: &std::path::Path) -> verify::BootAs {
    given.unwrap_or(if image.extension().is_some_and(|e| e == "vmdk") {
        verify::BootAs::Vsphere
    } else {
        verify::BootAs::Kvm
    })
}

fn boot_cmd(a: BootArgs) -> Result<i32> {
    let console = a.console.unwrap_or_else(|| {
        let mut p = a.image.clone().into_os_string();
        p.push(".boot.log");
        PathBuf::from(p)
    });
    let how = verify::boot(&verify::BootOptions {
        boot_as: boot_as(a.boot_as, &a.image),
        firmware: a.boot_firmware,
        vm: a.vm.choice(),
        image: a.image,
        console,
    })?;
    progress::info(&format!("QEMU: {how}"));
    Ok(0)
}

fn verify_cmd(a: VerifyArgs) -> Result<i32> {
    let out_dir = match a.out {
        Some(d) => d,
        None => a
            .image
            .parent()
            .map(|p| {
                if p.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    p.to_path_buf()
                }
            })
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let name = a
        .image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let mut steps = progress::Steps::new();
    let v = steps.run("verify", |_| {
        verify::verify(&VerifyOptions {
            image: a.image.clone(),
            out_dir: out_dir.clone(),
            name,
            vm: a.vm.choice(),
            timeout: a.vm.timeout,
            boot_as: boot_as(a.boot_as, &a.image),
            firmware: a.boot_firmware,
        })
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_verdict(&v);
    }
    Ok(if v.passed { 0 } else { 1 })
}

fn prove_cmd(a: ProveArgs) -> Result<i32> {
    let catalog = a.select.catalog()?;
    let target = Target::root(&a.root)?;
    let ctx = ScanContext::detect(&target, a.select.roles());
    let root = target.root_dir().to_path_buf();
    let proofs = scan::breaks::prove(&catalog, &root, &ctx, &a.select.controls)?;
    let unproven = proofs.iter().filter(|p| !p.proven()).count();
    match a.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&proofs)?),
        OutputFormat::Text => {
            for p in &proofs {
                let broken = p.broken.map_or("no recipe", |s| s.as_str());
                let mark = if p.proven() { "proven" } else { "NOT PROVEN" };
                println!(
                    "{:<36} {:>6} -> {:<14} {mark}",
                    p.id,
                    p.intact.as_str(),
                    broken
                );
                if !p.proven() {
                    for e in p.evidence.iter().take(3) {
                        println!("    {e}");
                    }
                }
            }
            println!(
                "{} controls: {} proven, {unproven} not",
                proofs.len(),
                proofs.len() - unproven
            );
        }
    }
    Ok(if unproven == 0 { 0 } else { 1 })
}

fn controls_cmd(a: ControlsArgs) -> Result<i32> {
    let catalog = Catalog::load(&stage_source(&a.stages))?;
    let list: Vec<_> = catalog
        .controls()
        .filter(|(_, c)| a.benchmark.selects(&c.refs))
        .collect();
    match a.format {
        OutputFormat::Json => {
            let v: Vec<serde_json::Value> = list
                .iter()
                .map(|(s, c)| {
                    serde_json::json!({
                        "id": c.id,
                        "title": c.title,
                        "severity": c.severity,
                        "stage": s.dir_name,
                        "refs": c.refs,
                        "when": { "stage": s.when, "control": c.when },
                        "rationale": c.rationale,
                        "fix": c.fix,
                        "check": c.check.describe(),
                        "break": c.breaks,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Text => {
            for (_, c) in &list {
                let mut refs: Vec<String> = c.refs.faq.iter().map(|f| format!("FAQ {f}")).collect();
                refs.extend(c.refs.stig.iter().map(|r| r.version.clone()));
                refs.extend(
                    c.refs
                        .cis
                        .iter()
                        .map(|r| format!("CIS {} {}", r.os(), r.id)),
                );
                println!("{:<34} {:<6} {}", c.id, c.severity.as_str(), c.title);
                if !refs.is_empty() {
                    println!("{:<41} {}", "", refs.join(", "));
                }
            }
            println!("{} controls", list.len());
        }
    }
    Ok(0)
}

/// One row of a coverage table.
#[derive(Debug, serde::Serialize)]
struct CoverageRow<'a> {
    id: &'a str,
    title: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    grade: &'a str,
    /// `covered`, `justified` (a written reason) or `gap`.
    status: &'static str,
    controls: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// A scan report from a file; anything else is the user's input error.
fn read_report(file: &std::path::Path) -> Result<scan::Report> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::new(file, format!("cannot read the scan report: {e}")))?;
    serde_json::from_str(&text).map_err(|e| {
        ConfigError::new(
            file,
            format!("not a stemforge scan report (`scan --format json`): {e}"),
        )
        .with_line(Some(e.line()))
        .into()
    })
}

fn diff_cmd(a: DiffArgs) -> Result<i32> {
    let old = read_report(&a.old)?;
    let new = read_report(&a.new)?;
    let d = scan::diff::diff(
        &old,
        &new,
        &a.old.display().to_string(),
        &a.new.display().to_string(),
    );
    let text = match a.format {
        DiffFormat::Text => scan::diff::render_text(&d),
        DiffFormat::Json => scan::diff::render_json(&d),
        DiffFormat::Junit => scan::diff::render_junit(&d),
    };
    match &a.output {
        Some(f) => crate::fsutil::write_atomic(f, text.as_bytes())?,
        None => print!("{text}"),
    }
    Ok(if d.regressions == 0 { 0 } else { 1 })
}

fn coverage_cmd(a: CoverageArgs) -> Result<i32> {
    let catalog = Catalog::load(&stage_source(&a.stages))?;
    let b = benchmarks::get();
    let items = b
        .items(&a.source)
        .with_context(|| format!("--source: no reference document `{}`", a.source))?;
    let rows: Vec<CoverageRow> = items
        .iter()
        .map(|item| {
            let controls: Vec<&str> = catalog
                .controls()
                .filter(|(_, c)| c.refs.keys().iter().any(|k| item.keys.contains(k)))
                .map(|(_, c)| c.id.as_str())
                .collect();
            let reason = b.reason(&a.source, &item.id);
            CoverageRow {
                id: &item.id,
                title: &item.title,
                grade: &item.grade,
                status: match (controls.is_empty(), reason) {
                    (false, _) => "covered",
                    (true, Some(_)) => "justified",
                    (true, None) => "gap",
                },
                controls,
                reason,
            }
        })
        .collect();
    let count = |s: &str| rows.iter().filter(|r| r.status == s).count();
    let (covered, justified, gaps) = (count("covered"), count("justified"), count("gap"));
    match a.format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "source": a.source,
                "items": rows.len(),
                "covered": covered,
                "justified": justified,
                "gaps": gaps,
                "rows": rows,
            }))?
        ),
        OutputFormat::Text => {
            for r in &rows {
                let what = match r.status {
                    "covered" => r.controls.join(", "),
                    "justified" => format!("n/a: {}", r.reason.unwrap_or_default()),
                    _ => "GAP".to_string(),
                };
                println!("{:<16} {:<9} {what}", r.id, r.status);
            }
            println!(
                "{}: {} items, {covered} covered, {justified} justified, {gaps} gaps",
                a.source,
                rows.len()
            );
        }
    }
    Ok(if gaps == 0 { 0 } else { 1 })
}

fn scan_cmd(a: ScanArgs, verbose: bool) -> Result<i32> {
    if a.report_dir.is_none() && a.format.len() > 1 {
        return Err(ConfigError::new(
            "--format",
            "several formats need --report-dir DIR (one file each)",
        )
        .into());
    }
    let catalog = a.select.catalog()?;
    let waivers = match &a.waivers {
        Some(f) => scan::waiver::load(f, &catalog)?,
        None => Vec::new(),
    };
    let target = match (&a.root, &a.image) {
        (Some(dir), _) => Target::root(dir)?,
        (None, Some(file)) => {
            let (t, layout) = Target::image(file).map_err(|e| {
                // A damaged or unreadable image is bad input.
                ConfigError::new(file, format!("{e:#}"))
            })?;
            for (point, what) in &layout.mounts {
                progress::detail(&format!("{point}: {what}"));
            }
            for n in &layout.notes {
                progress::detail(n);
            }
            t
        }
        (None, None) => Target::live(),
    };
    let ctx = ScanContext::detect(&target, a.select.roles());
    let mut report = scan::run(
        &catalog,
        &target,
        &ctx,
        &Selection {
            ids: a.select.controls.clone(),
            benchmark: a.benchmark,
        },
    );
    if !waivers.is_empty() {
        let today = chrono::Utc::now().date_naive();
        scan::waiver::apply(&mut report, &waivers, &ctx.profile, today);
    }
    match &a.report_dir {
        Some(dir) => {
            let formats = if a.format.is_empty() {
                vec![
                    ReportFormat::Json,
                    ReportFormat::Junit,
                    ReportFormat::Ckl,
                    ReportFormat::Cklb,
                    ReportFormat::Html,
                    ReportFormat::Sarif,
                ]
            } else {
                a.format.clone()
            };
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the report directory {}", dir.display()))?;
            for f in formats {
                let file = dir.join(f.file_name());
                crate::fsutil::write_atomic(&file, f.render(&report, verbose).as_bytes())?;
                progress::detail(&format!("wrote {}", file.display()));
            }
        }
        None => {
            let f = a.format.first().copied().unwrap_or(ReportFormat::Text);
            let text = f.render(&report, verbose);
            match &a.output {
                Some(file) => crate::fsutil::write_atomic(file, text.as_bytes())?,
                None => print!("{text}"),
            }
        }
    }
    Ok(if report.passed() { 0 } else { 1 })
}

fn profiles(a: ListArgs) -> Result<i32> {
    let source = profile_source(&a.profiles_dir);
    let mut list = Vec::new();
    for n in source.names()? {
        list.push(profile::load(&n, &source)?);
    }
    match a.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&list)?),
        OutputFormat::Text => {
            let width = list.iter().map(|p| p.name.len()).max().unwrap_or(0);
            for p in &list {
                let default = if p.name == DEFAULT_PROFILE {
                    " (default)"
                } else {
                    ""
                };
                let roles = if p.roles.is_empty() {
                    String::new()
                } else {
                    format!(", roles {}", p.roles.join(" "))
                };
                println!(
                    "{:<width$} {} {} ({}), kernel {}, {} partitions{roles}{default}",
                    p.name,
                    p.os.distro,
                    p.os.version,
                    p.os.codename,
                    p.kernel,
                    p.disk.partitions.len()
                );
            }
        }
    }
    Ok(0)
}

fn stages(a: StagesArgs) -> Result<i32> {
    let source = stage_source(&a.stages);
    let catalog = Catalog::load(&source)?;
    match a.format {
        OutputFormat::Json => {
            let v: Vec<serde_json::Value> = catalog
                .stages
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "stage": s.dir_name,
                        "summary": s.summary,
                        "when": s.when,
                        "controls": s.controls.iter().map(|c| serde_json::json!({
                            "id": c.id,
                            "title": c.title,
                            "severity": c.severity,
                            "refs": c.refs,
                            "when": c.when,
                            "check": c.check.describe(),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Text => {
            let mut total = 0;
            for s in &catalog.stages {
                let when = if s.when == Default::default() {
                    String::new()
                } else {
                    format!(" [{}]", s.when.describe())
                };
                println!("{}{when}: {} controls", s.dir_name, s.controls.len());
                for c in &s.controls {
                    let faq = if c.refs.faq.is_empty() {
                        String::new()
                    } else {
                        format!(" (FAQ {})", c.refs.faq.join(", "))
                    };
                    println!("  {:<30} {:<6} {}{faq}", c.id, c.severity.as_str(), c.title);
                }
                total += s.controls.len();
            }
            println!("{} stages, {total} controls", catalog.stages.len());
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_fits_80_columns() {
        let mut cmd = Cli::command();
        let mut texts = vec![cmd.render_long_help().to_string()];
        for sub in cmd.get_subcommands_mut() {
            texts.push(sub.render_long_help().to_string());
        }
        for t in texts {
            for l in t.lines() {
                assert!(l.chars().count() <= 80, "too wide: {l:?}");
            }
        }
    }

    #[test]
    fn build_defaults_to_ubuntu_noble_and_the_profiles_formats() {
        let cli = Cli::try_parse_from(["stemforge", "build"]).unwrap();
        let Command::Build(b) = cli.command else {
            panic!()
        };
        assert_eq!(b.profile, "ubuntu-noble");
        assert!(b.formats.is_empty());
        assert!(!b.no_verify);
    }

    #[test]
    fn scan_needs_a_target() {
        assert!(Cli::try_parse_from(["stemforge", "scan"]).is_err());
        assert!(Cli::try_parse_from(["stemforge", "scan", "--root", "/x", "--live"]).is_err());
        assert!(Cli::try_parse_from(["stemforge", "scan", "--live"]).is_ok());
    }
}
