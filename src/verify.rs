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
    /// The same for OVMF with Secure Boot enforced: SMM code and a
    /// variable store with Microsoft's keys enrolled.
    pub secure_boot_paths: Vec<FirmwarePair>,
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
    /// Secure Boot firmware: needs SMM and a secure flash.
    pub secure: bool,
}

/// How the guest's firmware starts the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BootFirmware {
    /// OVMF (UEFI), no Secure Boot
    Uefi,
    /// OVMF with Secure Boot enforced and Microsoft's keys enrolled
    SecureBoot,
    /// SeaBIOS, QEMU's legacy BIOS (the hybrid disk's i386-pc GRUB)
    Bios,
}

impl BootFirmware {
    pub fn name(self) -> &'static str {
        match self {
            BootFirmware::Uefi => "uefi",
            BootFirmware::SecureBoot => "secure-boot",
            BootFirmware::Bios => "bios",
        }
    }
}

/// The firmware of a VM: OVMF as flash, or QEMU's built-in SeaBIOS.
#[derive(Debug, Clone)]
pub enum VmFirmware {
    Ovmf(Firmware),
    SeaBios,
}

impl VmFirmware {
    pub fn find(
        def: &VmDef,
        mode: BootFirmware,
        given: Option<&str>,
        cache: &Path,
    ) -> Result<Self> {
        Ok(match mode {
            BootFirmware::Bios => VmFirmware::SeaBios,
            _ => VmFirmware::Ovmf(find_firmware(def, mode, given, cache)?),
        })
    }

    pub fn describe(&self) -> String {
        match self {
            VmFirmware::Ovmf(fw) => format!(
                "{} ({}{})",
                fw.code.display(),
                fw.source,
                if fw.secure {
                    ", Secure Boot enforced"
                } else {
                    ""
                }
            ),
            VmFirmware::SeaBios => "SeaBIOS (QEMU's built-in BIOS)".into(),
        }
    }

    /// QEMU's machine and firmware arguments, the variables copied to
    /// `vars`.
    fn args(&self, machine: &str, vars: &Path) -> Vec<String> {
        match self {
            VmFirmware::SeaBios => vec!["-machine".into(), machine.into()],
            VmFirmware::Ovmf(fw) => {
                let mut a = vec![
                    "-machine".into(),
                    if fw.secure {
                        format!("{machine},smm=on")
                    } else {
                        machine.into()
                    },
                ];
                if fw.secure {
                    a.extend([
                        "-global".into(),
                        "driver=cfi.pflash01,property=secure,value=on".into(),
                    ]);
                }
                a.extend([
                    "-drive".into(),
                    format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        fw.code.display()
                    ),
                    "-drive".into(),
                    format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
                ]);
                a
            }
        }
    }

    /// QEMU arguments that send the firmware's log to `log`, when the
    /// firmware does not write it to the serial console: SeaBIOS writes to
    /// the debug port (OVMF writes to the console).
    fn log_args(&self, log: &Path) -> Vec<String> {
        match self {
            VmFirmware::SeaBios => vec![
                "-chardev".into(),
                format!("file,id=fwlog,path={}", log.display()),
                "-device".into(),
                "isa-debugcon,iobase=0x402,chardev=fwlog".into(),
            ],
            VmFirmware::Ovmf(_) => Vec::new(),
        }
    }

    /// A fresh copy of the variable store at `vars` (OVMF only).
    fn fresh_vars(&self, vars: &Path) -> Result<()> {
        if let VmFirmware::Ovmf(fw) = self {
            std::fs::copy(&fw.vars, vars)
                .with_context(|| format!("copying {}", fw.vars.display()))?;
        }
        Ok(())
    }
}

/// Find OVMF: `--firmware`, QEMU's firmware descriptors, distro paths, and
/// as a last resort a verified download (ovmf-prebuilt) into `cache`
/// (plain UEFI only: it has no Microsoft keys).
pub fn find_firmware(
    def: &VmDef,
    mode: BootFirmware,
    given: Option<&str>,
    cache: &Path,
) -> Result<Firmware> {
    let secure = mode == BootFirmware::SecureBoot;
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
            secure,
        });
    }
    if let Some(fw) = from_descriptors(&def.firmware.descriptors, secure) {
        return Ok(fw);
    }
    let paths = if secure {
        &def.firmware.secure_boot_paths
    } else {
        &def.firmware.paths
    };
    for pair in paths {
        if Path::new(&pair.code).is_file() && Path::new(&pair.vars).is_file() {
            return Ok(Firmware {
                code: pair.code.clone().into(),
                vars: pair.vars.clone().into(),
                source: "distro path".into(),
                secure,
            });
        }
    }
    if secure {
        bail!(
            "no OVMF with Secure Boot and Microsoft's keys found (QEMU's descriptors, then {}): install ovmf, or pass --firmware CODE,VARS",
            paths
                .iter()
                .map(|p| p.vars.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
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
        secure: false,
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

/// The first x86_64 UEFI flash firmware for q35: with `secure`, one that
/// enforces Secure Boot with Microsoft's keys enrolled; otherwise one
/// without Secure Boot or SMM.
fn from_descriptors(dirs: &[String], secure: bool) -> Option<Firmware> {
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
        let has = |f: &str| d.features.iter().any(|x| x == f);
        let sb = ["secure-boot", "requires-smm", "enrolled-keys"];
        let fits = if secure {
            sb.iter().all(|f| has(f))
        } else {
            !sb.iter().any(|f| has(f))
        };
        if !d.interface_types.iter().any(|i| i == "uefi")
            || m.device != "flash"
            || !x86_q35
            || !fits
            || has("amd-sev-es")
            || has("intel-tdx")
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
                secure,
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
pub fn choose_accel(want: Accel, fw: &VmFirmware, def: &VmDef, scratch: &Path) -> (Accel, String) {
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
fn probe_kvm(fw: &VmFirmware, def: &VmDef, scratch: &Path) -> std::result::Result<(), String> {
    let vars = scratch.join("probe-vars.fd");
    let serial = scratch.join("probe-serial.log");
    let errlog = scratch.join("probe-stderr.log");
    fw.fresh_vars(&vars).map_err(|e| format!("{e:#}"))?;
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
            // The CPU the boot itself asks for: some KVMs start the
            // default model but cannot set the host's MSRs.
            "-cpu",
            "host",
            "-m",
            "256",
        ],
    )
    .args(fw.args(&def.machine, &vars))
    .args(fw.log_args(&serial))
    .args(match fw {
        VmFirmware::SeaBios => Vec::new(),
        VmFirmware::Ovmf(_) => vec!["-serial".into(), format!("file:{}", serial.display())],
    })
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

/// QEMU's version line (a cached verdict holds for one QEMU only).
pub fn qemu_version() -> String {
    exec::cmd(qemu_binary(), ["--version"])
        .run_unchecked()
        .map(|o| o.stdout_str().lines().next().unwrap_or("").to_string())
        .unwrap_or_default()
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
    /// `systemd-analyze time`: where the boot's time went (firmware,
    /// loader, kernel, userspace).
    #[serde(default)]
    pub boot_time: Option<String>,
    /// The slowest units of the boot (`systemd-analyze blame`), slowest
    /// first, in seconds.
    #[serde(default)]
    pub slowest_units: Vec<(String, f64)>,
    /// The live proofs of the image's roles (a container run, a login).
    #[serde(default)]
    pub role_proofs: Vec<crate::roles::Proof>,
}

/// The outcome of a verification.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    pub passed: bool,
    pub image: PathBuf,
    pub accel: String,
    pub firmware: String,
    /// How the firmware started the image.
    pub boot_firmware: BootFirmware,
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
    /// Set when the build reused this verdict (`--verify auto`): the disk
    /// was bit for bit the one booted then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reused: Option<Reused>,
}

/// Where a reused verdict came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reused {
    /// The verdict's cache key.
    pub key: String,
    /// The SHA-256 of the raw disk the boot proved.
    pub disk_sha256: String,
    /// When that boot ran (seconds since the epoch).
    pub verified_at: i64,
}

/// What the host did over SSH, logged in with the run's own key.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub firmware: BootFirmware,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
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
        // The image is the first boot device, whatever else the firmware
        // finds (the seed is a disk too).
        let (disk, nic) = match self {
            BootAs::Kvm => ("virtio-blk-pci,drive=disk0,bootindex=0", "virtio-net-pci"),
            // OVMF has no pvscsi driver, so the firmware could not load
            // GRUB from it: the disk sits on a SCSI bus OVMF reads, and a
            // pvscsi controller is there for the kernel's driver. The
            // network comes up on vmxnet3.
            BootAs::Vsphere => ("scsi-hd,drive=disk0,bus=scsi0.0,bootindex=0", "vmxnet3"),
            BootAs::Aws => (
                "nvme,drive=disk0,serial=vol0stemforge,bootindex=0",
                "virtio-net-pci",
            ),
        };
        let mut a: Vec<String> = Vec::new();
        if self == BootAs::Vsphere {
            a.extend(["-device".into(), "virtio-scsi-pci,id=scsi0".into()]);
        }
        a.extend([
            "-drive".into(),
            format!(
                "file={},format={format},if=none,id=disk0,cache=unsafe",
                file.display()
            ),
            "-device".into(),
            disk.into(),
            "-device".into(),
            format!("{nic},netdev=net0"),
        ]);
        match self {
            BootAs::Kvm => {}
            BootAs::Vsphere => a.extend(["-device".into(), "pvscsi,id=pvscsi0".into()]),
            BootAs::Aws => a.extend([
                "-smbios".into(),
                "type=1,manufacturer=Amazon EC2,product=m7i.large".into(),
            ]),
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
    pub fw: VmFirmware,
    pub accel: Accel,
    pub accel_note: String,
    pub seed: Seed,
    pub port: u16,
    pub format: String,
    vars: PathBuf,
}

impl Machine {
    pub fn prepare(image: &Path, choice: &VmChoice, mode: BootFirmware) -> Result<Machine> {
        let def = VmDef::load(choice.vm_def.as_deref())?;
        if exec::which(qemu_binary()).is_none() {
            bail!(
                "{} not found: apt-get install qemu-system-x86",
                qemu_binary()
            );
        }
        let format = image_format(image)?;
        let fw = VmFirmware::find(&def, mode, choice.firmware.as_deref(), &choice.cache_dir)?;
        let scratch = tempfile::Builder::new()
            .prefix("stemforge-vm-")
            .tempdir()
            .context("creating a scratch directory")?;
        let (accel, accel_note) = choose_accel(choice.accel, &fw, &def, scratch.path());
        progress::info(&format!(
            "    accelerator: {accel_note}; firmware: {}",
            fw.describe()
        ));
        let vars = scratch.path().join("vars.fd");
        fw.fresh_vars(&vars)?;
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

    /// Where the firmware's own log goes when it is not the console
    /// (SeaBIOS writes to QEMU's debug port).
    pub fn firmware_log(&self) -> PathBuf {
        self.scratch.path().join("firmware.log")
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
        .args(self.fw.args(&self.def.machine, &self.vars))
        .args(self.fw.log_args(&self.firmware_log()))
        .args(["-accel", if kvm { "kvm" } else { "tcg" }])
        .args(["-cpu", if kvm { "host" } else { "max" }])
        .args(["-smp", &self.def.cpus.to_string(), "-m", &self.def.memory])
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
    let m = Machine::prepare(&o.image, &o.vm, o.firmware)?;
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
        firmware: fw.describe(),
        boot_firmware: o.firmware,
        boot_seconds: None,
        total_seconds: 0.0,
        host_ssh_banner: None,
        clean_shutdown: false,
        problems: Vec::new(),
        console_log: console.clone(),
        agent: None,
        boot_as: o.boot_as,
        ssh_login: None,
        reused: None,
    };
    let mut watch = ConsoleWatch::new(&[&console_partial, &m.firmware_log()]);
    let outcome = converse(&vm, &sock, &m, t0, boot_limit, &mut watch, &mut verdict);
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
        let fw_tail = std::fs::read_to_string(m.firmware_log())
            .map(|t| exec::tail(&t, 8))
            .unwrap_or_default();
        if !fw_tail.trim().is_empty() {
            verdict
                .problems
                .push(format!("last firmware log lines:\n{fw_tail}"));
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
    watch: &mut ConsoleWatch,
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
        if v.boot_seconds.is_none() {
            if let Some(why) = watch.fatal() {
                bail!("{why}");
            }
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

/// Watches the console (and SeaBIOS's debug port log) for what ends a
/// boot before the guest can report: firmware or bootloader refusing the
/// next stage, no bootable disk, a kernel panic. Reads only what was
/// appended since the last look, at most every second.
pub struct ConsoleWatch {
    files: Vec<Watched>,
    last: Option<Instant>,
}

struct Watched {
    path: PathBuf,
    offset: u64,
    /// The unfinished last line of the previous read.
    carry: String,
}

/// Console text that means the boot is over, and what it means.
const FATAL_CONSOLE: &[(&str, &str)] = &[
    (
        "Access Denied",
        "the firmware refused to start the bootloader (Secure Boot: it is not signed by a key the firmware trusts)",
    ),
    (
        "Security Violation",
        "shim refused to start the next stage (Secure Boot: its signature is not trusted)",
    ),
    (
        "bad shim signature",
        "GRUB refused the kernel (Secure Boot: the kernel is not signed by a trusted key)",
    ),
    (
        "No bootable device",
        "the BIOS found no bootable disk (no BIOS boot code in the MBR)",
    ),
    ("Kernel panic - not syncing", "the kernel panicked"),
];

impl ConsoleWatch {
    pub fn new(paths: &[&Path]) -> Self {
        ConsoleWatch {
            files: paths
                .iter()
                .map(|p| Watched {
                    path: p.to_path_buf(),
                    offset: 0,
                    carry: String::new(),
                })
                .collect(),
            last: None,
        }
    }

    /// The first fatal line appended since the last call, explained.
    pub fn fatal(&mut self) -> Option<String> {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        self.last = Some(Instant::now());
        self.files.iter_mut().find_map(Watched::fatal)
    }
}

impl Watched {
    fn fatal(&mut self) -> Option<String> {
        use std::io::Seek;
        let mut f = std::fs::File::open(&self.path).ok()?;
        let len = f.metadata().ok()?.len();
        if len <= self.offset {
            return None;
        }
        // At most 1 MiB a look: the console of a boot is a few hundred KiB.
        let take = (len - self.offset).min(1 << 20);
        f.seek(std::io::SeekFrom::Start(self.offset)).ok()?;
        let mut buf = Vec::with_capacity(take as usize);
        f.take(take).read_to_end(&mut buf).ok()?;
        self.offset += buf.len() as u64;
        let text = std::mem::take(&mut self.carry) + &String::from_utf8_lossy(&buf);
        let (whole, rest) = match text.rfind('\n') {
            Some(i) => text.split_at(i + 1),
            None => ("", text.as_str()),
        };
        // A line without an end yet is kept for the next look (its last
        // 4 KiB at most).
        let mut cut = rest.len().saturating_sub(4096);
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        self.carry = rest[cut..].to_string();
        whole.lines().find_map(|l| {
            FATAL_CONSOLE
                .iter()
                .find(|(pat, _)| l.contains(pat))
                .map(|(_, why)| format!("{why}; the console says: {}", l.trim()))
        })
    }
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
        for p in a
            .role_proofs
            .iter()
            .filter(|p| !p.passed && p.skipped.is_none())
        {
            v.problems.push(format!(
                "role {}: {}: {}",
                p.role,
                p.name,
                p.evidence
                    .iter()
                    .filter(|e| e.starts_with("FAILED"))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
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
    pub firmware: BootFirmware,
    pub vm: VmChoice,
    /// Where the console log goes.
    pub console: PathBuf,
}

/// Boot an image for a person: the same VM as verify (changes discarded),
/// a fresh key, SSH on a free loopback port. Prints the ssh command once
/// sshd answers; Ctrl-C (or SIGTERM) powers the guest off (over SSH, and
/// the ACPI power button) and waits for it. Returns QEMU's exit
/// description; an error when the guest did not power off in time (QEMU is
/// stopped then).
pub fn boot(o: &BootOptions) -> Result<String> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("handling Ctrl-C")?;
    }
    let m = Machine::prepare(&o.image, &o.vm, o.firmware)?;
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
    // power button driver), and the ACPI power button as well. A loaded
    // host can make one SSH attempt fail, so it is repeated until the
    // guest is gone or the shutdown time is up.
    progress::info("powering the guest off");
    if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&monitor) {
        let _ = s.write_all(b"system_powerdown\n");
    }
    let deadline = Instant::now() + Duration::from_secs(m.def.timeouts.shutdown);
    let mut status = None;
    while status.is_none() && Instant::now() < deadline {
        match m
            .seed
            .ssh(m.port, "sudo -n systemctl poweroff")
            .timeout(Duration::from_secs(30))
            .run_unchecked()
        {
            // 255: the connection closed under it, as the guest went down.
            Ok(o) if o.status.success() || o.status.code() == Some(255) => {}
            Ok(o) => progress::warn(&format!(
                "powering off over SSH failed ({}): {}",
                exec::describe_status(o.status),
                exec::tail(&o.stderr_str(), 2)
            )),
            Err(e) => progress::warn(&format!("powering off over SSH failed: {e:#}")),
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(30));
        status = vm.wait_timeout(wait)?;
    }
    vm.kill();
    match status {
        Some(s) => Ok(exec::describe_status(s)),
        None => bail!(
            "the guest did not power off within {} s; QEMU was stopped (see {})",
            m.def.timeouts.shutdown,
            o.console.display()
        ),
    }
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
                 # The port's name can arrive after the device: the kernel then sends a change event.\n\
                 ACTION==\"add|change\", SUBSYSTEM==\"virtio-ports\", ATTR{{name}}==\"{PORT_NAME}\", TAG+=\"systemd\", ENV{{SYSTEMD_WANTS}}+=\"stemforge-verify.service\"\n"
            ),
        ),
    ]
}

/// The first `n` lines of `systemd-analyze blame` (`1min 2.345s unit`,
/// `812ms unit`) as (unit, seconds).
fn parse_blame(text: &str, n: usize) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| {
            let (time, unit) = l.trim().rsplit_once(' ')?;
            let mut secs = 0.0;
            for part in time.split_whitespace() {
                let (num, scale) = if let Some(v) = part.strip_suffix("ms") {
                    (v, 0.001)
                } else if let Some(v) = part.strip_suffix("us") {
                    (v, 0.000_001)
                } else if let Some(v) = part.strip_suffix("min") {
                    (v, 60.0)
                } else if let Some(v) = part.strip_suffix('s') {
                    (v, 1.0)
                } else {
                    return None;
                };
                secs += num.parse::<f64>().ok()? * scale;
            }
            Some((unit.to_string(), secs))
        })
        .take(n)
        .collect()
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
    println!(
        "stemforge agent: proving the roles [{}]",
        ctx.roles.join(", ")
    );
    let rescan = |ids: &[&str]| {
        scan::run(
            &catalog,
            &Target::live(),
            &ctx,
            &Selection {
                ids: ids.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
        )
    };
    let role_proofs = crate::roles::prove_live(&ctx.roles, &rescan);
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
        boot_time: cmd("systemd-analyze", ["time", "--no-pager"])
            .read()
            .ok()
            .and_then(|t| t.lines().next().map(|l| l.trim().to_string())),
        slowest_units: cmd("systemd-analyze", ["blame", "--no-pager"])
            .read()
            .map(|t| parse_blame(&t, 10))
            .unwrap_or_default(),
        role_proofs,
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
    fn descriptors_pick_plain_uefi_or_enforced_secure_boot_as_asked() {
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
        let dirs = [dir.path().display().to_string()];
        // Secure Boot without enrolled keys is neither.
        std::fs::write(
            dir.path().join("40-sb.json"),
            desc(r#""secure-boot","requires-smm""#),
        )
        .unwrap();
        assert!(from_descriptors(&dirs, false).is_none());
        assert!(from_descriptors(&dirs, true).is_none());
        std::fs::write(
            dir.path().join("30-ms.json"),
            desc(r#""enrolled-keys","secure-boot","requires-smm""#),
        )
        .unwrap();
        std::fs::write(dir.path().join("60-plain.json"), desc(r#""acpi-s3""#)).unwrap();
        let fw = from_descriptors(&dirs, false).unwrap();
        assert_eq!(fw.code, code);
        assert!(fw.source.contains("60-plain.json") && !fw.secure);
        let sb = from_descriptors(&dirs, true).unwrap();
        assert!(sb.source.contains("30-ms.json") && sb.secure);
    }

    #[test]
    fn secure_boot_firmware_runs_with_smm_and_a_secure_flash() {
        let fw = Firmware {
            code: "/c.fd".into(),
            vars: "/v.fd".into(),
            source: "t".into(),
            secure: true,
        };
        let a = VmFirmware::Ovmf(fw)
            .args("q35", Path::new("/w/vars.fd"))
            .join(" ");
        assert!(
            a.starts_with(
                "-machine q35,smm=on -global driver=cfi.pflash01,property=secure,value=on"
            ),
            "{a}"
        );
        assert!(
            a.contains("unit=0,readonly=on,file=/c.fd") && a.contains("unit=1,file=/w/vars.fd"),
            "{a}"
        );
        let bios = VmFirmware::SeaBios
            .args("q35", Path::new("/w/vars.fd"))
            .join(" ");
        assert_eq!(bios, "-machine q35");
    }

    #[test]
    fn the_console_watch_sees_a_refusal_split_across_reads_once() {
        use std::io::Write as _;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        let mut f = std::fs::File::create(&p).unwrap();
        let mut w = ConsoleWatch::new(&[&p]);
        assert_eq!(w.fatal(), None, "no file content yet");
        f.write_all(b"BdsDxe: loading Boot0001\r\nBdsDxe: failed to load Boot0001 \"UEFI QEMU HARDDISK\": Acc")
            .unwrap();
        w.last = None;
        assert_eq!(w.fatal(), None, "half a line is not judged");
        f.write_all(b"ess Denied\r\n").unwrap();
        w.last = None;
        let why = w.fatal().unwrap();
        assert!(
            why.starts_with("the firmware refused to start the bootloader"),
            "{why}"
        );
        assert!(why.contains("Boot0001"), "{why}");
        w.last = None;
        assert_eq!(w.fatal(), None, "read once");
        f.write_all(b"[    1.0] Linux version 6.1\nsystemd[1]: Started\n")
            .unwrap();
        w.last = None;
        assert_eq!(w.fatal(), None, "a normal boot is not fatal");
    }

    #[test]
    fn each_cloud_boots_the_image_first_on_its_own_bus_and_nic() {
        for (b, disk, nic) in [
            (BootAs::Kvm, "virtio-blk-pci", "virtio-net-pci"),
            (BootAs::Vsphere, "scsi-hd", "vmxnet3"),
            (BootAs::Aws, "nvme", "virtio-net-pci"),
        ] {
            let a = b.devices(Path::new("/i/disk.raw"), "raw");
            let devs: Vec<&String> = a
                .iter()
                .zip(a.iter().skip(1))
                .filter(|(k, _)| *k == "-device")
                .map(|(_, v)| v)
                .collect();
            assert!(
                devs.iter().any(|d| d.starts_with(disk)
                    && d.contains("drive=disk0")
                    && d.contains("bootindex=0")),
                "{b:?}: {a:?}"
            );
            assert!(
                devs.iter()
                    .any(|d| d.starts_with(&format!("{nic},netdev=net0"))),
                "{a:?}"
            );
            assert!(
                a.iter()
                    .any(|x| x.starts_with("file=/i/disk.raw,format=raw,if=none,id=disk0"))
            );
        }
        let aws = BootAs::Aws.devices(Path::new("/d"), "raw").join(" ");
        assert!(aws.contains("manufacturer=Amazon EC2"), "{aws}");
        let vs = BootAs::Vsphere.devices(Path::new("/d"), "vmdk").join(" ");
        assert!(
            vs.contains("pvscsi") && vs.contains("virtio-scsi-pci,id=scsi0"),
            "{vs}"
        );
    }

    #[test]
    fn blame_lines_become_seconds() {
        let t = "1min 2.500s cloud-init.service\n     812ms ssh.service\n 40us x.mount\nnonsense\n";
        let b = parse_blame(t, 10);
        assert_eq!(b.len(), 3, "{b:?}");
        assert_eq!(b[0].0, "cloud-init.service");
        assert!((b[0].1 - 62.5).abs() < 1e-9);
        assert!((b[1].1 - 0.812).abs() < 1e-9);
        assert_eq!(parse_blame(t, 1).len(), 1);
    }

    #[test]
    fn no_secure_boot_firmware_is_a_clear_error() {
        let mut def = VmDef::load(None).unwrap();
        def.firmware.descriptors.clear();
        def.firmware.secure_boot_paths = vec![FirmwarePair {
            code: "/nonexistent/CODE.secboot.fd".into(),
            vars: "/nonexistent/VARS.ms.fd".into(),
        }];
        let e = find_firmware(&def, BootFirmware::SecureBoot, None, Path::new("/tmp")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/VARS.ms.fd"), "{e}");
        assert!(e.to_string().contains("install ovmf"), "{e}");
    }

    #[test]
    fn explicit_firmware_must_exist() {
        let def = VmDef::load(None).unwrap();
        let e = find_firmware(
            &def,
            BootFirmware::Uefi,
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
        // The name may be set after the port is added (a change event).
        assert!(rule.contains("ACTION==\"add|change\""));
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
                profile: String::new(),
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
            boot_time: None,
            slowest_units: vec![],
            role_proofs: vec![],
        };
        let mut v = Verdict {
            passed: false,
            image: "x".into(),
            accel: String::new(),
            firmware: String::new(),
            boot_firmware: BootFirmware::Uefi,
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
            reused: None,
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
