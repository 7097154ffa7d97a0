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
}

/// Options of one verification run.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub image: PathBuf,
    pub out_dir: PathBuf,
    /// Prefix of the output files (`<name>.console.log`, ...).
    pub name: String,
    pub firmware: Option<String>,
    pub accel: Accel,
    pub timeout: Option<u64>,
    pub vm_def: Option<PathBuf>,
    pub cache_dir: PathBuf,
}

/// Boot the image and judge it. Writes `<name>.console.log`,
/// `<name>.scan.json` (the in-guest scan) and `<name>.verify.json`.
pub fn verify(o: &VerifyOptions) -> Result<Verdict> {
    let def = VmDef::load(o.vm_def.as_deref())?;
    if exec::which(qemu_binary()).is_none() {
        bail!(
            "{} not found: apt-get install qemu-system-x86",
            qemu_binary()
        );
    }
    let format = image_format(&o.image)?;
    let fw = find_firmware(&def, o.firmware.as_deref(), &o.cache_dir)?;
    let scratch = tempfile::Builder::new()
        .prefix("stemforge-verify-")
        .tempdir()
        .context("creating a scratch directory")?;
    let (accel, accel_note) = choose_accel(o.accel, &fw, &def, scratch.path());
    progress::info(&format!(
        "    accelerator: {accel_note}; firmware: {} ({})",
        fw.code.display(),
        fw.source
    ));
    let vars = scratch.path().join("vars.fd");
    std::fs::copy(&fw.vars, &vars).with_context(|| format!("copying {}", fw.vars.display()))?;
    let sock = scratch.path().join("results.sock");
    let console = o.out_dir.join(format!("{}.console.log", o.name));
    let console_partial = fsutil::partial_path(&console);
    let port = free_port()?;
    let boot_limit = Duration::from_secs(o.timeout.unwrap_or(def.timeouts.boot));

    let q = cmd(
        qemu_binary(),
        [
            "-nodefaults",
            "-no-user-config",
            "-name",
            "stemforge-verify",
            "-display",
            "none",
        ],
    )
    .args(["-machine", &def.machine])
    .args(["-accel", if accel == Accel::Kvm { "kvm" } else { "tcg" }])
    .args(["-cpu", if accel == Accel::Kvm { "host" } else { "max" }])
    .args(["-smp", &def.cpus.to_string(), "-m", &def.memory])
    .args(pflash(&fw.code, &vars))
    .arg("-drive")
    .arg(format!(
        "file={},format={format},if=virtio,cache=unsafe",
        o.image.display()
    ))
    .arg("-snapshot")
    .arg("-serial")
    .arg(format!("file:{}", console_partial.display()))
    .args(["-device", "virtio-serial-pci", "-chardev"])
    .arg(format!(
        "socket,id=results,path={},server=on,wait=off",
        sock.display()
    ))
    .arg("-device")
    .arg(format!("virtserialport,chardev=results,name={PORT_NAME}"))
    .arg("-netdev")
    .arg(format!(
        "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22"
    ))
    .args([
        "-device",
        "virtio-net-pci,netdev=net0",
        "-device",
        "virtio-rng-pci",
        "-no-reboot",
    ]);
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
    };
    let outcome = converse(&vm, &sock, port, t0, boot_limit, &def, &mut verdict);
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
    port: u16,
    t0: Instant,
    limit: Duration,
    def: &VmDef,
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
    v.host_ssh_banner = ssh_banner(port, Duration::from_secs(def.timeouts.ssh_banner));
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
        Some(f @ ("raw" | "qcow2")) => Ok(f.to_string()),
        other => bail!(
            "{}: unsupported image format {:?} (raw or qcow2)",
            image.display(),
            other
        ),
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free local port")?;
    Ok(l.local_addr()?.port())
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
    }
}
