//! Verification: boot the image under QEMU with OVMF and let it prove its
//! hardening from the inside.
//!
//! The harness gives the guest a dedicated channel, a virtio-serial port
//! named `org.stemforge.results` (never ttyS0, which the serial getty
//! resets). A udev rule in the image starts the agent only when that port
//! appears; the agent waits for boot to finish, collects failed units,
//! checks sshd, runs the live scan, sends one JSON report over the port,
//! waits for the harness's acknowledgement and powers off. Meanwhile the
//! harness checks that sshd answers through the VM's network. The console
//! (ttyS0) is kept as a log. QEMU is always killed on timeout or error.

use crate::exec::{self, cmd};
use crate::fsutil;
use crate::osimage::{AGENT_BINARY, AGENT_CATALOG, AgentFile};
use crate::progress;
use crate::scan::{self, Report, ScanContext, Selection, target::Target};
use crate::stage::{Catalog, StageSource};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The name of the results port.
pub const PORT_NAME: &str = "org.stemforge.results";
const START: &str = "STEMFORGE-AGENT-START";
const RESULT: &str = "STEMFORGE-RESULT ";
const ACK: &str = "STEMFORGE-ACK";

/// The VM definition (`qemu/verify.yml`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmDef {
    pub machine: String,
    pub memory: String,
    pub cpus: u32,
    pub firmware: FirmwareSearch,
    pub timeouts: Timeouts,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FirmwareSearch {
    /// Directories of QEMU firmware descriptors (JSON).
    pub descriptors: Vec<String>,
    /// Known distro locations of OVMF code and variable-store templates.
    pub paths: Vec<FirmwarePair>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FirmwarePair {
    pub code: String,
    pub vars: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// From QEMU start to the agent's report.
    pub boot: u64,
    /// How long KVM gets to show it can run the firmware.
    pub kvm_probe: u64,
    /// From the acknowledgement to QEMU's exit.
    pub shutdown: u64,
    /// For the host to read the SSH banner.
    pub ssh_banner: u64,
}

impl VmDef {
    /// The compiled-in definition, or a file.
    pub fn load(path: Option<&Path>) -> Result<VmDef> {
        let (file, text) = match path {
            Some(p) => (
                p.to_path_buf(),
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            ),
            None => (
                PathBuf::from("qemu/verify.yml"),
                crate::assets::QEMU
                    .get_file("verify.yml")
                    .and_then(|f| f.contents_utf8())
                    .unwrap_or_default()
                    .to_string(),
            ),
        };
        Ok(crate::config::parse_yaml(&file, &text)?)
    }
}

/// Firmware to boot with, and where it was found.
#[derive(Debug, Clone, Serialize)]
pub struct Firmware {
    pub code: PathBuf,
    pub vars: PathBuf,
    pub source: String,
}

/// Find OVMF: `--firmware`, QEMU's firmware descriptors, distro paths, and
/// as a last resort a verified download (ovmf-prebuilt) into `cache`.
pub fn find_firmware(def: &VmDef, given: Option<&str>, cache: &Path) -> Result<Firmware> {
    if let Some(spec) = given {
        let (code, vars) = match spec.split_once(',') {
            Some((c, v)) => (PathBuf::from(c), PathBuf::from(v)),
            None => {
                let c = PathBuf::from(spec);
                let v = guess_vars(&c).with_context(|| {
                    format!("--firmware {spec}: name the variable store too, as CODE,VARS")
                })?;
                (c, v)
            }
        };
        for f in [&code, &vars] {
            if !f.is_file() {
                bail!("--firmware: {} does not exist", f.display());
            }
        }
        return Ok(Firmware {
            code,
            vars,
            source: "--firmware".into(),
        });
    }
    if let Some(fw) = from_descriptors(&def.firmware.descriptors) {
        return Ok(fw);
    }
    for pair in &def.firmware.paths {
        if Path::new(&pair.code).is_file() && Path::new(&pair.vars).is_file() {
            return Ok(Firmware {
                code: pair.code.clone().into(),
                vars: pair.vars.clone().into(),
                source: "distro path".into(),
            });
        }
    }
    progress::info("no OVMF firmware installed; downloading a verified prebuilt copy");
    let dir = cache.join("ovmf");
    let pre = ovmf_prebuilt::Prebuilt::fetch(ovmf_prebuilt::Source::LATEST, &dir).map_err(|e| {
        anyhow::anyhow!(
            "no UEFI firmware found and downloading it failed ({e}); install OVMF (apt-get install ovmf) or pass --firmware CODE,VARS"
        )
    })?;
    Ok(Firmware {
        code: pre.get_file(ovmf_prebuilt::Arch::X64, ovmf_prebuilt::FileType::Code),
        vars: pre.get_file(ovmf_prebuilt::Arch::X64, ovmf_prebuilt::FileType::Vars),
        source: format!("ovmf-prebuilt {}", ovmf_prebuilt::Source::LATEST.tag),
    })
}

fn guess_vars(code: &Path) -> Option<PathBuf> {
    let name = code
        .file_name()?
        .to_string_lossy()
        .replace("CODE", "VARS")
        .replace("code", "vars");
    let v = code.with_file_name(name);
    v.is_file().then_some(v)
}

/// A QEMU firmware descriptor (the fields that matter here).
#[derive(Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "interface-types", default)]
    interface_types: Vec<String>,
    mapping: Option<Mapping>,
    #[serde(default)]
    targets: Vec<DescTarget>,
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Mapping {
    device: String,
    executable: Option<FileRef>,
    #[serde(rename = "nvram-template")]
    nvram_template: Option<FileRef>,
}

#[derive(Debug, Deserialize)]
struct FileRef {
    filename: String,
}

#[derive(Debug, Deserialize)]
struct DescTarget {
    architecture: String,
    #[serde(default)]
    machines: Vec<String>,
}

/// The first x86_64 UEFI flash firmware for q35 without Secure Boot or SMM
/// requirements (the image's GRUB is not signed).
fn from_descriptors(dirs: &[String]) -> Option<Firmware> {
    let mut files: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort_by_key(|p| p.file_name().map(|n| n.to_os_string()));
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let Ok(d) = serde_json::from_str::<Descriptor>(&text) else {
            continue;
        };
        let Some(m) = d.mapping else { continue };
        let x86_q35 = d.targets.iter().any(|t| {
            t.architecture == "x86_64"
                && t.machines
                    .iter()
                    .any(|m| crate::scan::target::wildcard_match(m, "pc-q35-9.0"))
        });
        let blocked = [
            "secure-boot",
            "requires-smm",
            "enrolled-keys",
            "amd-sev-es",
            "intel-tdx",
        ];
        if !d.interface_types.iter().any(|i| i == "uefi")
            || m.device != "flash"
            || !x86_q35
            || d.features.iter().any(|f| blocked.contains(&f.as_str()))
        {
            continue;
        }
        let (Some(code), Some(vars)) = (m.executable, m.nvram_template) else {
            continue;
        };
        if Path::new(&code.filename).is_file() && Path::new(&vars.filename).is_file() {
            return Some(Firmware {
                code: code.filename.into(),
                vars: vars.filename.into(),
                source: format!("descriptor {}", f.display()),
            });
        }
    }
    None
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when a probe shows it runs a guest, else TCG
    Auto,
    Kvm,
    Tcg,
}

/// Decide the accelerator. KVM counts only if it can run the firmware: a
/// /dev/kvm that exists but cannot run a normal guest (as under some
/// nested hypervisors) would hang the boot.
pub fn choose_accel(want: Accel, fw: &Firmware, def: &VmDef, scratch: &Path) -> (Accel, String) {
    match want {
        Accel::Tcg => (Accel::Tcg, "TCG (requested)".into()),
        Accel::Kvm => (Accel::Kvm, "KVM (requested)".into()),
        Accel::Auto => {
            let usable = std::fs::File::options()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok();
            if !usable {
                return (Accel::Tcg, "TCG (/dev/kvm is not available)".into());
            }
            match probe_kvm(fw, def, scratch) {
                Ok(()) => (Accel::Kvm, "KVM (probe ran the firmware)".into()),
                Err(why) => (Accel::Tcg, format!("TCG (KVM probe failed: {why})")),
            }
        }
    }
}

/// Start the firmware under KVM and wait for it to write to the serial
/// port; a working KVM does so within a second or two.
fn probe_kvm(fw: &Firmware, def: &VmDef, scratch: &Path) -> std::result::Result<(), String> {
    let vars = scratch.join("probe-vars.fd");
    let serial = scratch.join("probe-serial.log");
    let errlog = scratch.join("probe-stderr.log");
    std::fs::copy(&fw.vars, &vars).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&serial);
    let run = cmd(
        qemu_binary(),
        [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-accel",
            "kvm",
            "-m",
            "256",
        ],
    )
    .arg("-machine")
    .arg(&def.machine)
    .args(pflash(&fw.code, &vars))
    .arg("-serial")
    .arg(format!("file:{}", serial.display()))
    .spawn(&scratch.join("probe-stdout.log"), &errlog)
    .map_err(|e| format!("{e:#}"))?;
    let deadline = Instant::now() + Duration::from_secs(def.timeouts.kvm_probe);
    let result = loop {
        if serial.metadata().map(|m| m.len() > 0).unwrap_or(false) {
            break Ok(());
        }
        let err = std::fs::read_to_string(&errlog).unwrap_or_default();
        if err.contains("KVM internal error") || err.contains("emulation failure") {
            break Err("KVM internal error (emulation failure)".to_string());
        }
        if let Ok(Some(status)) = run.try_wait() {
            break Err(format!(
                "QEMU exited ({}): {}",
                exec::describe_status(status),
                exec::tail(&err, 2)
            ));
        }
        if Instant::now() > deadline {
            break Err(format!(
                "no firmware output within {} s",
                def.timeouts.kvm_probe
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    run.kill();
    result
}

/// The firmware as two flash drives: code read-only, variables writable.
fn pflash(code: &Path, vars: &Path) -> [String; 4] {
    [
        "-drive".into(),
        format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            code.display()
        ),
        "-drive".into(),
        format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
    ]
}

fn qemu_binary() -> &'static str {
    "qemu-system-x86_64"
}

/// What the agent in the guest reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentReport {
    pub system_state: String,
    pub failed_units: Vec<String>,
    pub sshd_listening: bool,
    pub sshd_banner: Option<String>,
    pub kernel: String,
    pub uptime_seconds: f64,
    pub scan: Report,
    /// Whether the BOSH agent's unit is active; absent when the image has
    /// no agent.
    #[serde(default)]
    pub bosh_agent_active: Option<bool>,
}

/// The outcome of a verification.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub passed: bool,
    pub image: PathBuf,
    pub accel: String,
    pub firmware: String,
    /// Seconds from QEMU start to the agent's first word.
    pub boot_seconds: Option<f64>,
    pub total_seconds: f64,
    /// The SSH banner the host read through the VM's network.
    pub host_ssh_banner: Option<String>,
    pub clean_shutdown: bool,
    pub problems: Vec<String>,
    pub console_log: PathBuf,
    pub agent: Option<AgentReport>,
    /// The hardware it booted on.
    pub boot_as: BootAs,
    /// The login over SSH with the run's key, and the scan run through it.
    pub ssh_login: Option<SshLogin>,
}

/// What the host did over SSH, logged in with the run's own key.
#[derive(Debug, Clone, Serialize)]
pub struct SshLogin {
    pub user: String,
    pub command: String,
    /// The scan's summary as `stemforge scan --live` reported it over SSH.
    pub scan: Option<crate::scan::Summary>,
    pub passed: bool,
    pub error: Option<String>,
}

/// Options of one verification run.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub image: PathBuf,
    pub out_dir: PathBuf,
    /// Prefix of the output files (`<name>.console.log`, ...).
    pub name: String,
    pub vm: VmChoice,
    pub timeout: Option<u64>,
    /// The hardware the image boots on, as a cloud presents it.
    pub boot_as: BootAs,
}

/// What a VM of the harness runs on: the user's choices.
#[derive(Debug, Clone)]
pub struct VmChoice {
    /// `CODE[,VARS]` firmware files, or `None` to search.
    pub firmware: Option<String>,
    pub accel: Accel,
    /// A VM definition instead of the built-in qemu/verify.yml.
    pub vm_def: Option<PathBuf>,
    /// Where downloaded firmware is cached.
    pub cache_dir: PathBuf,
}

/// The virtual hardware of a verification boot: each cloud's disk bus and
/// NIC, so the boot proves the image's drivers for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BootAs {
    /// KVM/OpenStack: virtio disk and NIC
    Kvm,
    /// vSphere: a SCSI disk, a pvscsi controller and a vmxnet3 NIC
    Vsphere,
    /// AWS Nitro: NVMe disk, SMBIOS saying Amazon EC2
    Aws,
}

impl BootAs {
    /// The QEMU arguments for the disk at `file` (of `format`) and the NIC
    /// on `net0`.
    fn devices(self, file: &Path, format: &str) -> Vec<String> {
        let drive = |iface: &str| {
            format!(
                "file={},format={format},if={iface},cache=unsafe{}",
                file.display(),
                if iface == "none" { ",id=disk0" } else { "" }
            )
        };
        let mut a: Vec<String> = Vec::new();
        match self {
            BootAs::Kvm => {
                a.extend(["-drive".into(), drive("virtio")]);
                a.extend(["-device".into(), "virtio-net-pci,netdev=net0".into()]);
            }
            BootAs::Vsphere => {
                // OVMF has no pvscsi driver, so the firmware could not
                // load GRUB from it: the disk sits on a SCSI bus OVMF
                // reads, and a pvscsi controller is there for the
                // kernel's driver. The network comes up on vmxnet3.
                a.extend(["-device".into(), "virtio-scsi-pci,id=scsi0".into()]);
                a.extend(["-drive".into(), drive("none")]);
                a.extend(["-device".into(), "scsi-hd,drive=disk0,bus=scsi0.0".into()]);
                a.extend(["-device".into(), "pvscsi,id=pvscsi0".into()]);
                a.extend(["-device".into(), "vmxnet3,netdev=net0".into()]);
            }
            BootAs::Aws => {
                a.extend(["-drive".into(), drive("none")]);
                a.extend([
                    "-device".into(),
                    "nvme,drive=disk0,serial=vol0stemforge".into(),
                ]);
                a.extend(["-device".into(), "virtio-net-pci,netdev=net0".into()]);
                a.extend([
                    "-smbios".into(),
                    "type=1,manufacturer=Amazon EC2,product=m7i.large".into(),
                ]);
            }
        }
        a
    }
}

/// A VM of the harness, ready to start: firmware with fresh variables, the
/// run's NoCloud seed and key, and SSH forwarded to a free loopback port.
/// Its scratch directory (key included) goes when it is dropped.
pub struct Machine {
    pub scratch: tempfile::TempDir,
    pub def: VmDef,
    pub fw: Firmware,
    pub accel: Accel,
    pub accel_note: String,
    pub seed: Seed,
    pub port: u16,
    pub format: String,
    vars: PathBuf,
}

impl Machine {
    pub fn prepare(image: &Path, choice: &VmChoice) -> Result<Machine> {
        let def = VmDef::load(choice.vm_def.as_deref())?;
        if exec::which(qemu_binary()).is_none() {
            bail!(
                "{} not found: apt-get install qemu-system-x86",
                qemu_binary()
            );
        }
        let format = image_format(image)?;
        let fw = find_firmware(&def, choice.firmware.as_deref(), &choice.cache_dir)?;
        let scratch = tempfile::Builder::new()
            .prefix("stemforge-vm-")
            .tempdir()
            .context("creating a scratch directory")?;
        let (accel, accel_note) = choose_accel(choice.accel, &fw, &def, scratch.path());
        progress::info(&format!(
            "    accelerator: {accel_note}; firmware: {} ({})",
            fw.code.display(),
            fw.source
        ));
        let vars = scratch.path().join("vars.fd");
        std::fs::copy(&fw.vars, &vars).with_context(|| format!("copying {}", fw.vars.display()))?;
        let seed = Seed::make(scratch.path())?;
        let port = free_port()?;
        Ok(Machine {
            scratch,
            def,
            fw,
            accel,
            accel_note,
            seed,
            port,
            format,
            vars,
        })
    }

    /// QEMU for `image` on `boot_as` hardware, its console to `console`
    /// (a file), changes discarded (`-snapshot`).
    pub fn qemu(&self, image: &Path, boot_as: BootAs, console: &Path) -> exec::Cmd {
        let kvm = self.accel == Accel::Kvm;
        cmd(
            qemu_binary(),
            [
                "-nodefaults",
                "-no-user-config",
                "-name",
                "stemforge",
                "-display",
                "none",
            ],
        )
        .args(["-machine", &self.def.machine])
        .args(["-accel", if kvm { "kvm" } else { "tcg" }])
        .args(["-cpu", if kvm { "host" } else { "max" }])
        .args(["-smp", &self.def.cpus.to_string(), "-m", &self.def.memory])
        .args(pflash(&self.fw.code, &self.vars))
        .args(boot_as.devices(image, &self.format))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            self.seed.iso.display()
        ))
        .arg("-snapshot")
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-netdev")
        .arg(format!(
            "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{}-:22",
            self.port
        ))
        .args(["-device", "virtio-rng-pci", "-no-reboot"])
    }
}

/// Boot the image and judge it. Writes `<name>.console.log`,
/// `<name>.scan.json` (the in-guest scan) and `<name>.verify.json`.
pub fn verify(o: &VerifyOptions) -> Result<Verdict> {
    let m = Machine::prepare(&o.image, &o.vm)?;
    let (def, fw) = (&m.def, &m.fw);
    let accel_note = m.accel_note.clone();
    let scratch = &m.scratch;
    let sock = scratch.path().join("results.sock");
    let console = o.out_dir.join(format!("{}.console.log", o.name));
    let console_partial = fsutil::partial_path(&console);
    let boot_limit = Duration::from_secs(o.timeout.unwrap_or(def.timeouts.boot));
    let q = m
        .qemu(&o.image, o.boot_as, &console_partial)
        .args(["-device", "virtio-serial-pci", "-chardev"])
        .arg(format!(
            "socket,id=results,path={},server=on,wait=off",
            sock.display()
        ))
        .arg("-device")
        .arg(format!("virtserialport,chardev=results,name={PORT_NAME}"));
    let t0 = Instant::now();
    let vm = q.spawn(
        &scratch.path().join("qemu.stdout"),
        &scratch.path().join("qemu.stderr"),
    )?;
    let mut verdict = Verdict {
        passed: false,
        image: o.image.clone(),
        accel: accel_note,
        firmware: format!("{} ({})", fw.code.display(), fw.source),
        boot_seconds: None,
        total_seconds: 0.0,
        host_ssh_banner: None,
        clean_shutdown: false,
        problems: Vec::new(),
        console_log: console.clone(),
        agent: None,
        boot_as: o.boot_as,
        ssh_login: None,
    };
    let outcome = converse(&vm, &sock, &m, t0, boot_limit, &mut verdict);
    if let Err(e) = &outcome {
        verdict.problems.push(format!("{e:#}"));
    }
    // Wait for the guest to power off, then make sure QEMU is gone.
    if outcome.is_ok() {
        match vm.wait_timeout(Duration::from_secs(def.timeouts.shutdown))? {
            Some(_) => verdict.clean_shutdown = true,
            None => verdict.problems.push(format!(
                "the guest did not power off within {} s",
                def.timeouts.shutdown
            )),
        }
    }
    vm.kill();
    verdict.total_seconds = t0.elapsed().as_secs_f64();
    if console_partial.exists() {
        fsutil::commit(&console_partial, &console)?;
    }
    if !verdict.problems.is_empty() && verdict.agent.is_none() {
        let tail = std::fs::read_to_string(&console)
            .map(|t| exec::tail(&t, 15))
            .unwrap_or_default();
        let qerr = vm.stderr_tail();
        if !qerr.trim().is_empty() {
            verdict.problems.push(format!("QEMU said: {}", qerr.trim()));
        }
        if !tail.trim().is_empty() {
            verdict
                .problems
                .push(format!("last console lines:\n{tail}"));
        }
    }
    judge(&mut verdict);
    if let Some(a) = &verdict.agent {
        fsutil::write_atomic(
            &o.out_dir.join(format!("{}.scan.json", o.name)),
            scan::report::render_json(&a.scan).as_bytes(),
        )?;
    }
    fsutil::write_atomic(
        &o.out_dir.join(format!("{}.verify.json", o.name)),
        (serde_json::to_string_pretty(&verdict)? + "\n").as_bytes(),
    )?;
    Ok(verdict)
}

/// Talk to the agent: wait for its report, check SSH from the host, then
/// acknowledge so the guest powers off.
fn converse(
    vm: &exec::Running,
    sock: &Path,
    m: &Machine,
    t0: Instant,
    limit: Duration,
    v: &mut Verdict,
) -> Result<()> {
    let deadline = t0 + limit;
    let stream = loop {
        if let Some(status) = vm.try_wait()? {
            bail!("QEMU exited early ({})", exec::describe_status(status));
        }
        if let Ok(s) = std::os::unix::net::UnixStream::connect(sock) {
            break s;
        }
        if Instant::now() > deadline {
            bail!("QEMU did not open the results channel");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        if Instant::now() > deadline {
            bail!(
                "the guest did not report within {} s (boot too slow, or the agent never started: see the console log)",
                limit.as_secs()
            );
        }
        if let Some(status) = vm.try_wait()? {
            bail!(
                "QEMU exited before the agent reported ({})",
                exec::describe_status(status)
            );
        }
        match reader.read_line(&mut line) {
            Ok(0) => std::thread::sleep(Duration::from_millis(200)),
            Ok(_) if line.ends_with('\n') => {
                let l = std::mem::take(&mut line);
                let l = l.trim_end();
                if l == START {
                    v.boot_seconds = Some(t0.elapsed().as_secs_f64());
                    progress::activity(&format!(
                        "guest booted after {:.0} s; scanning",
                        t0.elapsed().as_secs_f64()
                    ));
                } else if let Some(json) = l.strip_prefix(RESULT) {
                    let report: AgentReport = serde_json::from_str(json)
                        .context("the agent's report is not valid JSON")?;
                    v.agent = Some(report);
                    break;
                }
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("reading the results channel"),
        }
    }
    progress::activity("checking sshd from the host");
    let limit = m.def.timeouts.ssh_banner;
    v.host_ssh_banner = ssh_banner(m.port, Duration::from_secs(limit));
    if v.host_ssh_banner.is_some() {
        progress::activity("logging in over SSH with the run's key");
        v.ssh_login = Some(m.seed.login_and_scan(m.port, limit));
    }
    writer
        .write_all(format!("{ACK}\n").as_bytes())
        .context("acknowledging the agent")?;
    Ok(())
}

/// One attempt to read the SSH identification string from
/// 127.0.0.1:port.
fn read_ssh_banner(port: u16) -> Option<String> {
    let addr = ([127, 0, 0, 1], port).into();
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf[..n]).trim().to_string();
    text.starts_with("SSH-").then_some(text)
}

/// The SSH banner through the VM's forwarded port, retried until `limit`.
fn ssh_banner(port: u16, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(b) = read_ssh_banner(port) {
            return Some(b);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    None
}

fn judge(v: &mut Verdict) {
    if let Some(a) = &v.agent {
        if a.system_state != "running" {
            v.problems.push(format!(
                "system state is {:?}, not \"running\"",
                a.system_state
            ));
        }
        if !a.failed_units.is_empty() {
            v.problems
                .push(format!("failed units: {}", a.failed_units.join(", ")));
        }
        if !a.sshd_listening {
            v.problems.push("sshd is not listening on port 22".into());
        }
        if a.bosh_agent_active == Some(false) {
            v.problems
                .push("the BOSH agent's unit is not active".into());
        }
        if !a.scan.passed() {
            let failing: Vec<String> = a
                .scan
                .problems()
                .map(|r| {
                    format!(
                        "{} ({})",
                        r.id,
                        r.evidence.first().cloned().unwrap_or_default()
                    )
                })
                .collect();
            v.problems.push(format!(
                "scan: {} controls failed: {}",
                failing.len(),
                failing.join("; ")
            ));
        }
        if v.host_ssh_banner.is_none() {
            v.problems
                .push("sshd did not answer through the VM's network".into());
        }
        match &v.ssh_login {
            Some(l) if !l.passed => v.problems.push(format!(
                "logging in over SSH as {} with the run's key: {}",
                l.user,
                l.error
                    .as_deref()
                    .unwrap_or("the scan run through it failed")
            )),
            None if v.host_ssh_banner.is_some() => {
                v.problems.push("no login over SSH was tried".into())
            }
            _ => {}
        }
    } else if v.problems.is_empty() {
        v.problems.push("the agent sent no report".into());
    }
    v.passed = v.problems.is_empty();
}

fn image_format(image: &Path) -> Result<String> {
    if !image.is_file() {
        bail!("image {} does not exist", image.display());
    }
    let info = cmd("qemu-img", ["info", "--output=json"])
        .arg(image)
        .read()
        .with_context(|| format!("inspecting {}", image.display()))?;
    let v: serde_json::Value = serde_json::from_str(&info).context("parsing qemu-img info")?;
    match v["format"].as_str() {
        Some(f @ ("raw" | "qcow2" | "vmdk")) => Ok(f.to_string()),
        other => bail!(
            "{}: unsupported image format {:?} (raw, qcow2 or vmdk)",
            image.display(),
            other
        ),
    }
}

/// The user the NoCloud seed creates for the host's login.
pub const LOGIN_USER: &str = "stemforge";

/// A NoCloud seed (an ISO 9660 volume labelled `cidata`, as cloud-init
/// looks for it) that creates [`LOGIN_USER`] with this run's own SSH key
/// and passwordless sudo. The key lives and dies with the run's scratch
/// directory.
pub struct Seed {
    pub iso: PathBuf,
    pub key: PathBuf,
}

#[derive(Serialize)]
struct CloudUser<'a> {
    name: &'a str,
    gecos: &'a str,
    shell: &'a str,
    lock_passwd: bool,
    sudo: &'a str,
    ssh_authorized_keys: Vec<String>,
}

#[derive(Serialize)]
struct UserData<'a> {
    users: Vec<CloudUser<'a>>,
}

#[derive(Serialize)]
struct MetaData {
    #[serde(rename = "instance-id")]
    instance_id: String,
    #[serde(rename = "local-hostname")]
    local_hostname: String,
}

impl Seed {
    pub fn make(dir: &Path) -> Result<Seed> {
        let key = dir.join("id_ed25519");
        cmd("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C"])
            .arg("stemforge-verify")
            .arg("-f")
            .arg(&key)
            .run()
            .context("making the run's SSH key")?;
        let public = std::fs::read_to_string(key.with_extension("pub"))
            .context("reading the run's public key")?;
        let files = dir.join("seed");
        std::fs::create_dir_all(&files).context("creating the seed directory")?;
        let user_data = UserData {
            users: vec![CloudUser {
                name: LOGIN_USER,
                gecos: "stemforge verification",
                shell: "/bin/bash",
                lock_passwd: true,
                sudo: "ALL=(ALL) NOPASSWD:ALL",
                ssh_authorized_keys: vec![public.trim().to_string()],
            }],
        };
        let text = format!("#cloud-config\n{}", serde_yaml::to_string(&user_data)?);
        std::fs::write(files.join("user-data"), text).context("writing user-data")?;
        let id = hex::encode(crate::disk::random_bytes(8)?);
        let meta = MetaData {
            instance_id: format!("stemforge-verify-{id}"),
            local_hostname: "stemforge-verify".into(),
        };
        std::fs::write(files.join("meta-data"), serde_yaml::to_string(&meta)?)
            .context("writing meta-data")?;
        let iso = dir.join("seed.iso");
        cmd(
            "genisoimage",
            ["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"],
        )
        .arg(&iso)
        .arg(files.join("user-data"))
        .arg(files.join("meta-data"))
        .run()
        .context("making the NoCloud seed")?;
        Ok(Seed { iso, key })
    }

    /// The ssh command line that logs in as [`LOGIN_USER`] on the VM's
    /// forwarded port and runs `remote`.
    fn ssh(&self, port: u16, remote: &str) -> exec::Cmd {
        cmd(
            "ssh",
            [
                "-F",
                "/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=20",
                "-i",
            ],
        )
        .arg(&self.key)
        .args(["-p", &port.to_string()])
        .arg(format!("{LOGIN_USER}@127.0.0.1"))
        .arg(remote)
    }

    /// Log in and run the live scan through the connection, retrying the
    /// login for up to `limit` seconds (sshd may still be starting).
    fn login_and_scan(&self, port: u16, limit: u64) -> SshLogin {
        let remote = format!("sudo -n {AGENT_BINARY} scan --live --format json");
        let mut login = SshLogin {
            user: LOGIN_USER.into(),
            command: remote.clone(),
            scan: None,
            passed: false,
            error: None,
        };
        let deadline = Instant::now() + Duration::from_secs(limit);
        let out = loop {
            match self.ssh(port, "true").run_unchecked() {
                Ok(o) if o.status.success() => break self.ssh(port, &remote).run_unchecked(),
                Ok(o) if Instant::now() > deadline => {
                    login.error = Some(format!("login refused: {}", o.stderr_str().trim()));
                    return login;
                }
                Err(e) if Instant::now() > deadline => {
                    login.error = Some(format!("{e:#}"));
                    return login;
                }
                _ => std::thread::sleep(Duration::from_secs(2)),
            }
        };
        match out {
            Ok(o) => match serde_json::from_slice::<Report>(&o.stdout) {
                Ok(report) => {
                    login.passed = report.passed();
                    if !login.passed {
                        let ids: Vec<&str> = report.problems().map(|r| r.id.as_str()).collect();
                        login.error = Some(format!("the scan over SSH failed: {}", ids.join(", ")));
                    }
                    login.scan = Some(report.summary);
                }
                Err(e) => {
                    login.error = Some(format!(
                        "the scan over SSH printed no report ({e}): {}",
                        exec::tail(&o.stderr_str(), 5)
                    ))
                }
            },
            Err(e) => login.error = Some(format!("{e:#}")),
        }
        login
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free local port")?;
    Ok(l.local_addr()?.port())
}

// ---- stemforge boot ---------------------------------------------------------

/// Options of `stemforge boot`.
#[derive(Debug, Clone)]
pub struct BootOptions {
    pub image: PathBuf,
    pub boot_as: BootAs,
    pub vm: VmChoice,
    /// Where the console log goes.
    pub console: PathBuf,
}

/// Boot an image for a person: the same VM as verify (changes discarded),
/// a fresh key, SSH on a free loopback port. Prints the ssh command once
/// sshd answers; Ctrl-C (or SIGTERM) powers the guest off (over SSH, and
/// the ACPI power button) and waits for it, then stops QEMU. Returns QEMU's exit description.
pub fn boot(o: &BootOptions) -> Result<String> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("handling Ctrl-C")?;
    }
    let m = Machine::prepare(&o.image, &o.vm)?;
    let monitor = m.scratch.path().join("monitor.sock");
    let q = m
        .qemu(&o.image, o.boot_as, &o.console)
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()));
    let vm = q.spawn(
        &m.scratch.path().join("qemu.stdout"),
        &m.scratch.path().join("qemu.stderr"),
    )?;
    progress::info(&format!(
        "booting {} as {:?}; console: {} (Ctrl-C powers it off)",
        o.image.display(),
        o.boot_as,
        o.console.display()
    ));
    let mut announced = false;
    loop {
        if let Some(status) = vm.try_wait()? {
            return Ok(exec::describe_status(status));
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if !announced && read_ssh_banner(m.port).is_some() {
            announced = true;
            let argv: Vec<String> = m
                .seed
                .ssh(m.port, "")
                .arguments()
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .filter(|a| !a.is_empty())
                .collect();
            println!("sshd answers; cloud-init may need a few seconds more to make the user.");
            println!(
                "ssh {}",
                shlex::try_join(argv.iter().map(String::as_str)).unwrap_or_else(|_| argv.join(" "))
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Through SSH with the run's key (a cloud kernel may have no ACPI
    // power button driver), and the ACPI power button as well.
    progress::info("powering the guest off");
    let _ = m
        .seed
        .ssh(m.port, "sudo -n systemctl poweroff")
        .run_unchecked();
    if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&monitor) {
        let _ = s.write_all(b"system_powerdown\n");
    }
    let status = vm.wait_timeout(Duration::from_secs(m.def.timeouts.shutdown))?;
    vm.kill();
    Ok(match status {
        Some(s) => exec::describe_status(s),
        None => format!(
            "the guest did not power off within {} s; QEMU was stopped",
            m.def.timeouts.shutdown
        ),
    })
}

// ---- the guest side --------------------------------------------------------

/// The files that make the agent start under the harness (and only then).
pub fn agent_files() -> Vec<AgentFile> {
    vec![
        (
            "/etc/systemd/system/stemforge-verify.service",
            0o644,
            format!(
                "# stemforge: the verification agent. Started only by the udev rule below,\n\
                 # when the harness's {PORT_NAME} port exists.\n\
                 [Unit]\n\
                 Description=stemforge verification agent\n\
                 After=multi-user.target\n\n\
                 [Service]\n\
                 Type=simple\n\
                 ExecStart={AGENT_BINARY} agent\n\
                 StandardOutput=journal+console\n\
                 StandardError=journal+console\n"
            ),
        ),
        (
            "/etc/udev/rules.d/90-stemforge-verify.rules",
            0o644,
            format!(
                "# stemforge: start the verification agent when the harness's port appears.\n\
                 ACTION==\"add\", SUBSYSTEM==\"virtio-ports\", ATTR{{name}}==\"{PORT_NAME}\", TAG+=\"systemd\", ENV{{SYSTEMD_WANTS}}+=\"stemforge-verify.service\"\n"
            ),
        ),
    ]
}

/// The device of the results port, if the harness provided one.
pub fn find_port() -> Option<PathBuf> {
    let rd = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for e in rd.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

/// Whether anything listens on TCP port 22 (IPv4 or IPv6).
pub fn sshd_listening() -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(":0016") && cols[3] == "0A"
            })
    })
}

/// The in-guest agent (`stemforge agent`). Returns without doing anything
/// when the harness's port is absent.
pub fn run_agent() -> Result<()> {
    let Some(dev) = find_port() else {
        println!("stemforge agent: no {PORT_NAME} port; not under the verification harness");
        return Ok(());
    };
    let mut port = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&dev)
        .with_context(|| format!("opening {}", dev.display()))?;
    port.write_all(format!("{START}\n").as_bytes())?;
    port.flush()?;
    println!("stemforge agent: waiting for boot to finish");
    let state = cmd("systemctl", ["is-system-running", "--wait"])
        .timeout(Duration::from_secs(600))
        .run_unchecked()
        .map(|o| o.stdout_str().trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e:#})"));
    let failed = cmd(
        "systemctl",
        [
            "list-units",
            "--failed",
            "--plain",
            "--no-legend",
            "--no-pager",
        ],
    )
    .read()
    .unwrap_or_default()
    .lines()
    .filter_map(|l| l.split_whitespace().next().map(str::to_string))
    .collect();
    let banner = read_ssh_banner(22);
    println!("stemforge agent: system {state}; scanning");
    let source = if Path::new(AGENT_CATALOG).is_dir() {
        StageSource::Dir(AGENT_CATALOG.into())
    } else {
        StageSource::Embedded
    };
    let catalog = Catalog::load(&source)?;
    let target = Target::live();
    let ctx = ScanContext::detect(&target, None);
    let report = scan::run(&catalog, &target, &ctx, &Selection::default());
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let agent = AgentReport {
        system_state: state,
        failed_units: failed,
        sshd_listening: sshd_listening(),
        sshd_banner: banner,
        kernel,
        uptime_seconds: uptime,
        scan: report,
        bosh_agent_active: std::path::Path::new(crate::boshagent::BINARY)
            .exists()
            .then(|| {
                cmd(
                    "systemctl",
                    ["is-active", "--quiet", crate::boshagent::UNIT],
                )
                .run_unchecked()
                .is_ok_and(|o| o.status.success())
            }),
    };
    println!(
        "stemforge agent: scan {} pass, {} fail; reporting",
        agent.scan.summary.pass, agent.scan.summary.fail
    );
    port.write_all(format!("{RESULT}{}\n", serde_json::to_string(&agent)?).as_bytes())?;
    port.flush()?;
    // Wait (bounded) for the harness to finish its own checks.
    let mut reader = BufReader::new(port);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(n) if n > 0 && line.trim() == ACK => break,
            Ok(0) => std::thread::sleep(Duration::from_millis(200)),
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    println!("stemforge agent: powering off");
    cmd("systemctl", ["poweroff"]).run()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vm_definition_loads() {
        let d = VmDef::load(None).unwrap();
        assert_eq!(d.machine, "q35");
        assert!(d.timeouts.boot >= 300, "TCG boots need at least 300 s");
        assert!(!d.firmware.paths.is_empty());
    }

    #[test]
    fn descriptors_skip_secure_boot_and_pick_plain_uefi() {
        let dir = tempfile::tempdir().unwrap();
        let code = dir.path().join("CODE.fd");
        let vars = dir.path().join("VARS.fd");
        std::fs::write(&code, "c").unwrap();
        std::fs::write(&vars, "v").unwrap();
        let desc = |features: &str| {
            format!(
                r#"{{"interface-types":["uefi"],"mapping":{{"device":"flash","executable":{{"filename":"{}","format":"raw"}},"nvram-template":{{"filename":"{}","format":"raw"}}}},"targets":[{{"architecture":"x86_64","machines":["pc-q35-*"]}}],"features":[{features}]}}"#,
                code.display(),
                vars.display()
            )
        };
        std::fs::write(
            dir.path().join("40-sb.json"),
            desc(r#""secure-boot","requires-smm""#),
        )
        .unwrap();
        let only_sb = from_descriptors(&[dir.path().display().to_string()]);
        assert!(only_sb.is_none());
        std::fs::write(dir.path().join("60-plain.json"), desc(r#""acpi-s3""#)).unwrap();
        let fw = from_descriptors(&[dir.path().display().to_string()]).unwrap();
        assert_eq!(fw.code, code);
        assert!(fw.source.contains("60-plain.json"));
    }

    #[test]
    fn explicit_firmware_must_exist() {
        let def = VmDef::load(None).unwrap();
        let e = find_firmware(
            &def,
            Some("/nonexistent/CODE.fd,/nonexistent/VARS.fd"),
            Path::new("/tmp"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn agent_files_tie_the_rule_to_the_unit() {
        let files = agent_files();
        let rule = &files[1].2;
        assert!(rule.contains("ATTR{name}==\"org.stemforge.results\""));
        assert!(rule.contains("SYSTEMD_WANTS}+=\"stemforge-verify.service\""));
        assert!(
            files[0]
                .2
                .contains("ExecStart=/usr/lib/stemforge/stemforge agent")
        );
        assert!(
            !files[0].2.contains("[Install]"),
            "only udev starts the agent"
        );
    }

    #[test]
    fn judge_requires_every_part() {
        let report = Report {
            scanner: "stemforge".into(),
            version: "0".into(),
            target: scan::TargetInfo {
                kind: "live".into(),
                path: "/".into(),
            },
            context: ScanContext {
                distro: "debian".into(),
                codename: "bookworm".into(),
                version: "12".into(),
                pretty_name: String::new(),
                roles: vec![],
                roles_from: "none".into(),
            },
            started: String::new(),
            duration_ms: 0,
            summary: scan::Summary {
                total: 1,
                pass: 1,
                ..Default::default()
            },
            results: vec![],
        };
        let agent = AgentReport {
            system_state: "running".into(),
            failed_units: vec![],
            sshd_listening: true,
            sshd_banner: Some("SSH-2.0-OpenSSH_9.2p1".into()),
            kernel: "6.1".into(),
            uptime_seconds: 50.0,
            scan: report,
            bosh_agent_active: None,
        };
        let mut v = Verdict {
            passed: false,
            image: "x".into(),
            accel: String::new(),
            firmware: String::new(),
            boot_seconds: Some(50.0),
            total_seconds: 60.0,
            host_ssh_banner: Some("SSH-2.0-OpenSSH_9.2p1".into()),
            clean_shutdown: true,
            problems: vec![],
            console_log: "c".into(),
            agent: Some(agent.clone()),
            boot_as: BootAs::Kvm,
            ssh_login: Some(SshLogin {
                user: LOGIN_USER.into(),
                command: "scan".into(),
                scan: None,
                passed: true,
                error: None,
            }),
        };
        judge(&mut v);
        assert!(v.passed, "{:?}", v.problems);
        let mut degraded = v.clone();
        degraded.passed = false;
        degraded.agent.as_mut().unwrap().system_state = "degraded".into();
        degraded.agent.as_mut().unwrap().failed_units = vec!["auditd.service".into()];
        judge(&mut degraded);
        assert!(!degraded.passed);
        assert_eq!(degraded.problems.len(), 2);
        let mut no_ssh = v.clone();
        no_ssh.host_ssh_banner = None;
        judge(&mut no_ssh);
        assert!(!no_ssh.passed);
        // Booted, but nobody can log in: a failed verification.
        let mut no_login = v.clone();
        no_login.ssh_login.as_mut().unwrap().passed = false;
        no_login.ssh_login.as_mut().unwrap().error = Some("Permission denied".into());
        judge(&mut no_login);
        assert!(!no_login.passed);
        assert!(
            no_login.problems[0].contains("Permission denied"),
            "{:?}",
            no_login.problems
        );
        let mut never_tried = v.clone();
        never_tried.ssh_login = None;
        judge(&mut never_tried);
        assert!(!never_tried.passed);
    }
}
