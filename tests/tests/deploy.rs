//! The image and the chart (issue 14, items 1, 2 and 4): the `Dockerfile`'s stages agree
//! with the toolchain, the binary and the chart; hadolint passes it; `helm lint --strict`
//! passes the chart with its default and production-like values (`ci/prod-values.yaml`);
//! the objects `helm template` renders are what GKE needs (probes, drain, grace period,
//! security context, Services, BackendConfig, PDB, HPA, NetworkPolicy, Secret references,
//! monitoring); the chart's environment names are the origin's settings; the alerts and the
//! dashboard use only catalogued metrics.
//!
//! There is no container engine or Kubernetes API on the build machines: the image is
//! checked by reading the Dockerfile (and the ELF of the origin binary), and the rendered
//! objects by parsing them (`kubectl apply --dry-run=client` needs a server even with
//! `--validate=false`). helm and hadolint are real binaries installed by `scripts/setup.sh`
//! (`HELM_BIN`, `HADOLINT_BIN`); a missing one fails these tests, it never skips them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{CommandFactory, Parser};
use gateway_tests::harness::{tools_dir, workspace_bin};
use origin::config::Config;
use serde_json::{json, Value};

/// The workspace root (this crate is `tests/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

fn chart_dir() -> PathBuf {
    root().join("deploy/helm/noetl-gateway")
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("YAML: {e}\n{text}"))
}

/// A tool `scripts/setup.sh` installs: `$<var>`, else its place under the tools directory.
fn tool(var: &str, installed_at: &str) -> PathBuf {
    let bin = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| tools_dir().join(installed_at));
    assert!(
        bin.exists(),
        "{} is missing: run scripts/setup.sh (make test does)",
        bin.display()
    );
    bin
}

fn helm_bin() -> PathBuf {
    tool("HELM_BIN", "bin/helm")
}

/// Runs helm; `Ok(stdout)` or `Err(stderr)`.
fn helm(args: &[&str]) -> Result<String, String> {
    let out = Command::new(helm_bin())
        .args(args)
        // No user or cluster configuration leaks into the render.
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("gateway-helm-config"),
        )
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("gateway-helm-cache"),
        )
        .env(
            "HELM_DATA_HOME",
            std::env::temp_dir().join("gateway-helm-data"),
        )
        .env("KUBECONFIG", "/dev/null")
        .output()
        .expect("run helm");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stderr}{stdout}"))
    }
}

/// The Kubernetes version the chart targets (Chart.yaml `kubeVersion` allows it).
const KUBE_VERSION: &str = "1.30.0";
const NAMESPACE: &str = "gateway";
const RELEASE: &str = "gw";

fn prod_values() -> String {
    chart_dir()
        .join("ci/prod-values.yaml")
        .to_string_lossy()
        .into_owned()
}

/// `helm template` with extra arguments; the objects, or helm's error.
fn try_render(extra: &[&str]) -> Result<Vec<Value>, String> {
    let chart = chart_dir().to_string_lossy().into_owned();
    let mut args = vec![
        "template",
        RELEASE,
        &chart,
        "--namespace",
        NAMESPACE,
        "--kube-version",
        KUBE_VERSION,
    ];
    args.extend_from_slice(extra);
    let text = helm(&args)?;
    let mut objects = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc)
            .unwrap_or_else(|e| panic!("rendered YAML does not parse: {e}\n{text}"));
        if !v.is_null() {
            objects.push(v);
        }
    }
    Ok(objects)
}

fn render(extra: &[&str]) -> Vec<Value> {
    try_render(extra).unwrap_or_else(|e| panic!("helm template {extra:?} failed:\n{e}"))
}

/// The two value sets `make test` checks: the defaults and the production-like values.
fn renders() -> Vec<(&'static str, Vec<Value>)> {
    let prod = prod_values();
    vec![("default", render(&[])), ("prod", render(&["-f", &prod]))]
}

fn kinds(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap().to_owned())
        .collect()
}

fn all_of<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = all_of(objects, kind);
    assert_eq!(found.len(), 1, "exactly one {kind}: {found:#?}");
    found[0]
}

fn deployment(objects: &[Value]) -> &Value {
    one(objects, "Deployment")
}

fn container(objects: &[Value]) -> &Value {
    let containers = deployment(objects)["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    assert_eq!(containers.len(), 1, "one container: the origin");
    &containers[0]
}

/// The container's port numbers by name.
fn container_ports(objects: &[Value]) -> BTreeMap<String, u64> {
    container(objects)["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The container's env entries by name (a name twice fails).
fn env(objects: &[Value]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for e in container(objects)["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_owned();
        assert!(
            out.insert(name.clone(), e.clone()).is_none(),
            "env {name} twice"
        );
    }
    out
}

fn env_value(objects: &[Value], name: &str) -> Option<String> {
    env(objects)
        .get(name)
        .and_then(|e| e["value"].as_str().map(str::to_owned))
}

/// A `"20s"` setting in whole seconds.
fn seconds(value: &str) -> u64 {
    humantime::parse_duration(value)
        .unwrap_or_else(|e| panic!("{value}: {e}"))
        .as_secs()
}

/// The origin's defaults (its required flags given).
fn origin_defaults() -> Config {
    Config::try_parse_from([
        "origin",
        "--auth-audience",
        "aud",
        "--auth-jwks-url",
        "http://127.0.0.1:1/jwks",
        "--auth-issuer",
        "http://127.0.0.1:1/",
    ])
    .unwrap()
}

/// Every environment variable the origin reads through its configuration.
fn origin_env_names() -> BTreeSet<String> {
    Config::command()
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

/// The settings whose type is `Secret` in config.rs (their values are redacted when the
/// configuration is printed): they may come from a Secret only.
fn secret_settings() -> BTreeSet<String> {
    let text = read(root().join("origin/src/config.rs"));
    let mut out = BTreeSet::new();
    let mut pending_env: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if let Some(i) = line.find("env = \"") {
            let rest = &line[i + 7..];
            pending_env = Some(rest[..rest.find('"').unwrap()].to_owned());
        } else if line.starts_with("pub ") && line.contains(':') {
            if let Some(env) = pending_env.take() {
                let ty = line.split_once(':').unwrap().1;
                if ty.contains("Secret") {
                    out.insert(env);
                }
            }
        }
    }
    assert!(
        out.contains("GATEWAY_INTERNAL_TOKEN") && out.contains("GATEWAY_CALLBACK_SECRET"),
        "config.rs's Secret fields: {out:?}"
    );
    out
}

// ---------------------------------------------------------------------------------------
// The image
// ---------------------------------------------------------------------------------------

/// One Dockerfile instruction: its stage (index of the `FROM` it follows), keyword and
/// arguments, continuation lines joined.
#[derive(Debug)]
struct Instruction {
    stage: usize,
    keyword: String,
    args: String,
}

fn dockerfile() -> Vec<Instruction> {
    let text = read(root().join("Dockerfile"));
    let mut out = Vec::new();
    let mut current = String::new();
    let mut stage = 0usize;
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (keyword, args) = current.split_once(char::is_whitespace).unwrap();
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            stage += 1;
        }
        out.push(Instruction {
            stage,
            keyword,
            args: args.split_whitespace().collect::<Vec<_>>().join(" "),
        });
        current.clear();
    }
    out
}

fn stage_named(instructions: &[Instruction], name: &str) -> usize {
    instructions
        .iter()
        .find(|i| {
            i.keyword == "FROM"
                && i.args
                    .to_ascii_lowercase()
                    .ends_with(&format!(" as {name}"))
        })
        .unwrap_or_else(|| panic!("no stage `{name}`"))
        .stage
}

fn in_stage<'a>(instructions: &'a [Instruction], stage: usize, keyword: &str) -> Vec<&'a str> {
    instructions
        .iter()
        .filter(|i| i.stage == stage && i.keyword == keyword)
        .map(|i| i.args.as_str())
        .collect()
}

/// `KEY=value` pairs of a stage's `ENV` instructions.
fn env_of(instructions: &[Instruction], stage: usize) -> BTreeMap<String, String> {
    in_stage(instructions, stage, "ENV")
        .into_iter()
        .flat_map(|args| args.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn toolchain_channel() -> String {
    let text = read(root().join("rust-toolchain.toml"));
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("channel"))
        .expect("rust-toolchain.toml names a channel");
    line.split('"').nth(1).unwrap().to_owned()
}

/// The origin package's binary name (`[[bin]] name` in origin/Cargo.toml).
fn origin_bin_name() -> String {
    let text = read(root().join("origin/Cargo.toml"));
    let bin = text.split("[[bin]]").nth(1).expect("origin has a [[bin]]");
    let line = bin
        .lines()
        .find(|l| l.trim_start().starts_with("name"))
        .unwrap();
    line.split('"').nth(1).unwrap().to_owned()
}

#[test]
fn the_builder_is_the_pinned_toolchain_and_copies_the_binary_cargo_builds() {
    let df = dockerfile();
    let builder = stage_named(&df, "builder");
    let channel = toolchain_channel();
    let from = in_stage(&df, builder, "FROM")[0];
    assert_eq!(
        from,
        format!("rust:{channel}-bookworm AS builder"),
        "the builder is rust-toolchain.toml's {channel}"
    );
    // The toolchain file asks for components and targets a release build does not need;
    // naming the image's toolchain keeps rustup from installing them.
    assert_eq!(
        env_of(&df, builder).get("RUSTUP_TOOLCHAIN"),
        Some(&channel),
        "RUSTUP_TOOLCHAIN names the image's toolchain"
    );

    let workdir = in_stage(&df, builder, "WORKDIR")
        .last()
        .expect("the builder has a WORKDIR")
        .to_string();
    let bin = origin_bin_name();
    let run = in_stage(&df, builder, "RUN")
        .into_iter()
        .find(|r| r.contains("cargo build"))
        .expect("the builder runs cargo build");
    assert!(
        run.contains("cargo build --release --locked -p noetl-gateway-origin"),
        "a locked release build of the origin package: {run}"
    );
    // Where that cargo command puts the binary (no --target, no CARGO_TARGET_DIR).
    assert!(!run.contains("--target ") && !run.contains("CARGO_TARGET_DIR"));
    let built = format!("{workdir}/target/release/{bin}");
    let (_, after) = run
        .split_once(&built)
        .unwrap_or_else(|| panic!("the RUN takes the binary from {built}: {run}"));
    let staged = after.split_whitespace().next().expect("copied somewhere");
    assert!(
        !staged.starts_with(&format!("{workdir}/target")),
        "the binary leaves the cached target directory in the same RUN"
    );

    let runtime = stage_named(&df, "runtime");
    assert_eq!(
        runtime,
        df.iter().map(|i| i.stage).max().unwrap(),
        "runtime is last"
    );
    let copies = in_stage(&df, runtime, "COPY");
    let copy = copies
        .iter()
        .find(|c| c.starts_with("--from=builder "))
        .expect("the runtime copies from the builder");
    let parts: Vec<&str> = copy.split_whitespace().collect();
    assert_eq!(
        parts[1], staged,
        "COPY --from takes what the builder staged"
    );
    let installed = parts[2];
    let entrypoint: Vec<String> =
        serde_json::from_str(in_stage(&df, runtime, "ENTRYPOINT")[0]).expect("exec form");
    assert_eq!(entrypoint, [installed], "ENTRYPOINT runs the copied binary");
    assert!(in_stage(&df, runtime, "CMD").is_empty());
}

#[test]
fn the_runtime_has_ca_certificates_and_the_builders_debian() {
    let df = dockerfile();
    let runtime = stage_named(&df, "runtime");
    let from = in_stage(&df, runtime, "FROM")[0];
    let image = from.split_whitespace().next().unwrap();
    // The TLS stack reads the system store (reqwest's rustls-platform-verifier and
    // async-nats through rustls-native-certs), e.g. for Auth0's JWKS.
    let lock = read(root().join("Cargo.lock"));
    assert!(
        lock.contains("name = \"rustls-native-certs\"")
            || lock.contains("name = \"rustls-platform-verifier\""),
        "the origin's TLS roots come from the system store"
    );
    if image.starts_with("gcr.io/distroless/cc-") || image.starts_with("gcr.io/distroless/base-") {
        // distroless cc and base ship /etc/ssl/certs/ca-certificates.crt.
    } else {
        let runs = in_stage(&df, runtime, "RUN").join(" ");
        assert!(
            runs.contains("ca-certificates"),
            "a runtime other than distroless cc/base installs ca-certificates: {image}"
        );
    }
    // The binary is linked against the builder's glibc: the runtime is the same release.
    assert!(
        image.contains("debian12"),
        "bookworm (Debian 12) builder, Debian 12 runtime: {image}"
    );
    // No shell: the chart's preStop uses the kubelet's sleep, not `sh -c sleep`.
    assert!(
        in_stage(&df, runtime, "RUN").is_empty(),
        "distroless has no shell to RUN"
    );
}

#[test]
fn the_image_user_and_ports_are_the_charts_and_the_origins() {
    let df = dockerfile();
    let runtime = stage_named(&df, "runtime");
    let user = in_stage(&df, runtime, "USER");
    let user = user.last().expect("the runtime sets USER");
    let (uid, gid) = user.split_once(':').unwrap_or((user, user));
    let uid: u64 = uid
        .parse()
        .expect("USER is numeric (runAsNonRoot needs a number)");
    let gid: u64 = gid.parse().expect("the group is numeric");
    assert_ne!(uid, 0, "non-root");

    let defaults = origin_defaults();
    let public = u64::from(defaults.public_addr.port());
    let internal = u64::from(defaults.internal_addr.port());
    let exposed: BTreeSet<u64> = in_stage(&df, runtime, "EXPOSE")
        .iter()
        .flat_map(|e| e.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from([public, internal]),
        "EXPOSE = the origin's defaults"
    );
    let image_env = env_of(&df, runtime);
    assert_eq!(image_env["PUBLIC_ADDR"], format!("0.0.0.0:{public}"));
    assert_eq!(image_env["INTERNAL_ADDR"], format!("0.0.0.0:{internal}"));
    // mimalloc's huge pages off for the process, whatever the node's THP setting.
    assert_eq!(image_env["MIMALLOC_ALLOW_THP"], "0");

    for (name, objects) in renders() {
        let pod = &deployment(&objects)["spec"]["template"]["spec"]["securityContext"];
        assert_eq!(
            pod["runAsUser"], uid,
            "{name}: runAsUser = the image's USER"
        );
        assert_eq!(
            pod["runAsGroup"], gid,
            "{name}: runAsGroup = the image's group"
        );
        let c = &container(&objects)["securityContext"];
        assert_eq!(c["runAsUser"], uid, "{name}");
        let ports = container_ports(&objects);
        assert_eq!(
            ports,
            BTreeMap::from([("internal".into(), internal), ("public".into(), public)]),
            "{name}: container ports = EXPOSE = the origin's defaults"
        );
    }
}

#[test]
fn the_build_context_leaves_out_build_outputs_and_keeps_the_sources() {
    let text = read(root().join(".dockerignore"));
    let patterns: BTreeSet<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for out in [
        "target/",
        "node_modules/",
        ".wrangler/",
        ".git/",
        ".dev/",
        "edge-worker/build/",
    ] {
        assert!(patterns.contains(out), ".dockerignore leaves out {out}");
    }
    // What `cargo build --locked -p noetl-gateway-origin` reads: every member's manifest and
    // sources, the lock, the toolchain file.
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "rust-toolchain.toml",
        "origin/",
        "shared/",
        "tests/",
        "edge-worker/",
        "*",
        "**",
    ] {
        assert!(
            !patterns.contains(needed),
            ".dockerignore must not leave out {needed}"
        );
    }
}

#[test]
fn hadolint_passes_the_dockerfile() {
    let hadolint = tool("HADOLINT_BIN", "venv/bin/hadolint");
    let out = Command::new(hadolint)
        .args(["--no-color", "--failure-threshold", "style"])
        .arg(root().join("Dockerfile"))
        .output()
        .expect("run hadolint");
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The shared libraries an ELF64 little-endian executable names (`DT_NEEDED`).
fn elf_needed(path: &Path) -> Vec<String> {
    use std::os::unix::fs::FileExt;
    let file = fs::File::open(path).unwrap();
    let read_at = |offset: u64, len: usize| {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).unwrap();
        buf
    };
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap());
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let header = read_at(0, 64);
    assert_eq!(
        &header[..4],
        b"\x7fELF",
        "{} is an ELF file",
        path.display()
    );
    assert_eq!((header[4], header[5]), (2, 1), "ELF64, little-endian");
    let (phoff, phentsize, phnum) = (
        u64_at(&header, 0x20),
        u64::from(u16_at(&header, 0x36)),
        u16_at(&header, 0x38),
    );
    // (type, offset, vaddr, filesz) of each program header.
    let segments: Vec<(u32, u64, u64, u64)> = (0..u64::from(phnum))
        .map(|i| {
            let ph = read_at(phoff + i * phentsize, 56);
            (
                u32_at(&ph, 0),
                u64_at(&ph, 8),
                u64_at(&ph, 16),
                u64_at(&ph, 32),
            )
        })
        .collect();
    let to_offset = |vaddr: u64| {
        segments
            .iter()
            .find(|s| s.0 == 1 && (s.2..s.2 + s.3).contains(&vaddr))
            .map(|s| vaddr - s.2 + s.1)
            .expect("address in a PT_LOAD segment")
    };
    let Some(dynamic) = segments.iter().find(|s| s.0 == 2) else {
        return Vec::new(); // static
    };
    let entries = read_at(dynamic.1, dynamic.3 as usize);
    let (mut needed, mut strtab) = (Vec::new(), None);
    for e in entries.chunks_exact(16) {
        match u64_at(e, 0) {
            0 => break,
            1 => needed.push(u64_at(e, 8)),
            5 => strtab = Some(to_offset(u64_at(e, 8))),
            _ => {}
        }
    }
    let strtab = strtab.expect("DT_STRTAB");
    needed
        .into_iter()
        .map(|off| {
            let bytes = read_at(strtab + off, 256);
            let end = bytes.iter().position(|&b| b == 0).unwrap();
            String::from_utf8(bytes[..end].to_vec()).unwrap()
        })
        .collect()
}

#[test]
fn the_origin_binary_links_only_what_distroless_cc_ships() {
    // distroless/cc-debian12: glibc (libc, libm, libpthread, libdl, librt, the loader) and
    // libgcc_s — no OpenSSL (the origin's TLS is rustls), no libstdc++ needed.
    let shipped = [
        "libc.so.6",
        "libm.so.6",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
        "libgcc_s.so.1",
        "ld-linux-x86-64.so.2",
        "ld-linux-aarch64.so.1",
    ];
    let needed = elf_needed(&workspace_bin("origin"));
    assert!(needed.iter().any(|n| n == "libc.so.6"), "{needed:?}");
    let missing: Vec<_> = needed
        .iter()
        .filter(|n| !shipped.contains(&n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the runtime image lacks {missing:?} (needs {needed:?})"
    );
}

// ---------------------------------------------------------------------------------------
// The chart
// ---------------------------------------------------------------------------------------

#[test]
fn helm_is_3_17_and_lint_strict_passes_with_default_and_production_values() {
    let version = helm(&["version", "--short"]).unwrap();
    assert!(version.starts_with("v3.17."), "helm {version}");
    let chart = chart_dir().to_string_lossy().into_owned();
    let prod = prod_values();
    for extra in [&[][..], &["-f", prod.as_str()][..]] {
        let mut args = vec!["lint", "--strict", &chart, "--kube-version", KUBE_VERSION];
        args.extend_from_slice(extra);
        let out = helm(&args).unwrap_or_else(|e| panic!("helm lint {extra:?}:\n{e}"));
        assert!(out.contains("0 chart(s) failed"), "{out}");
        // In lint, `fail` and missing-value errors are only logged: none may be.
        assert!(
            !out.contains("[ERROR]") && !out.contains("[WARNING]"),
            "{out}"
        );
    }
}

#[test]
fn the_chart_versions_follow_the_workspace() {
    let chart = yaml(&read(chart_dir().join("Chart.yaml")));
    let cargo = read(root().join("Cargo.toml"));
    let workspace_version = cargo
        .split("[workspace.package]")
        .nth(1)
        .and_then(|s| s.lines().find(|l| l.trim_start().starts_with("version")))
        .and_then(|l| l.split('"').nth(1))
        .unwrap();
    assert_eq!(
        chart["appVersion"], workspace_version,
        "appVersion = the origin's version"
    );
    assert_eq!(chart["apiVersion"], "v2");
}

#[test]
fn the_kinds_are_rendered_when_enabled_and_absent_when_disabled() {
    let always = [
        "Deployment",
        "Service",
        "ServiceAccount",
        "BackendConfig",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    ];
    let monitoring = ["ServiceMonitor", "PrometheusRule", "ConfigMap"];
    for (name, objects) in renders() {
        let kinds = kinds(&objects);
        for k in always {
            assert!(kinds.contains(k), "{name}: {k} rendered ({kinds:?})");
        }
        assert_eq!(
            all_of(&objects, "Service").len(),
            2,
            "{name}: public + internal"
        );
        assert!(
            !kinds.contains("Secret"),
            "{name}: the chart never makes a Secret"
        );
        for k in monitoring {
            assert_eq!(kinds.contains(k), name == "prod", "{name}: {k}");
        }
    }
    let bare = render(&[
        "--set",
        "gke.backendConfig.enabled=false,gke.neg=false,podDisruptionBudget.enabled=false,\
         autoscaling.enabled=false,networkPolicy.enabled=false,serviceAccount.create=false,\
         replicaCount=3",
    ]);
    let kinds = kinds(&bare);
    assert_eq!(
        kinds,
        BTreeSet::from(["Deployment".to_owned(), "Service".to_owned()]),
        "everything optional off"
    );
    assert_eq!(
        deployment(&bare)["spec"]["replicas"],
        3,
        "replicas without an HPA"
    );
    let public = all_of(&bare, "Service")
        .into_iter()
        .find(|s| s["metadata"]["labels"]["app.kubernetes.io/component"] == "public")
        .unwrap();
    assert!(
        public["metadata"]["annotations"].is_null(),
        "no NEG, no BackendConfig"
    );
    // preStop's sleep action is on by default from 1.30: the chart refuses older clusters.
    let err = try_render(&["--kube-version", "1.29.0"]).expect_err("1.29 is refused");
    assert!(err.contains("kubeVersion"), "{err}");
    assert!(
        deployment(&renders()[0].1)["spec"]["replicas"].is_null(),
        "with the HPA on, the Deployment leaves the count to it"
    );
}

#[test]
fn the_pod_probes_drains_and_runs_locked_down() {
    for (name, objects) in renders() {
        let values = if name == "prod" {
            yaml(&read(prod_values()))
        } else {
            yaml(&read(chart_dir().join("values.yaml")))
        };
        let c = container(&objects);
        for (probe, path) in [
            ("readinessProbe", "/ready"),
            ("livenessProbe", "/health"),
            ("startupProbe", "/health"),
        ] {
            assert_eq!(c[probe]["httpGet"]["path"], path, "{name}: {probe}");
            assert_eq!(
                c[probe]["httpGet"]["port"], "internal",
                "{name}: {probe} port"
            );
        }
        // preStop: the kubelet's sleep (the image has no shell).
        let pre_stop = &c["lifecycle"]["preStop"];
        assert!(
            pre_stop["exec"].is_null(),
            "{name}: no exec preStop without a shell"
        );
        let pre_stop_s = pre_stop["sleep"]["seconds"]
            .as_u64()
            .expect("preStop sleep");
        assert_eq!(
            pre_stop_s,
            values["drain"]["preStopSleepSeconds"].as_u64().unwrap()
        );
        assert!(
            pre_stop_s >= 1,
            "{name}: endpoint removal gets time to propagate"
        );

        let drain = seconds(&env_value(&objects, "DRAIN_DELAY").expect("DRAIN_DELAY"));
        let grace = seconds(&env_value(&objects, "SHUTDOWN_GRACE").expect("SHUTDOWN_GRACE"));
        assert_eq!(
            drain,
            values["drain"]["delaySeconds"].as_u64().unwrap(),
            "{name}"
        );
        let termination = deployment(&objects)["spec"]["template"]["spec"]
            ["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap();
        assert!(
            termination > pre_stop_s + drain + grace,
            "{name}: terminationGracePeriodSeconds {termination} > preStop {pre_stop_s} + \
             DRAIN_DELAY {drain} + SHUTDOWN_GRACE {grace}"
        );
        assert_eq!(
            env_value(&objects, "PUBLIC_ADDR").unwrap(),
            format!("0.0.0.0:{}", container_ports(&objects)["public"])
        );
        assert_eq!(
            env_value(&objects, "INTERNAL_ADDR").unwrap(),
            format!("0.0.0.0:{}", container_ports(&objects)["internal"])
        );

        let pod = &deployment(&objects)["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(pod["automountServiceAccountToken"], false, "{name}");
        let sc = &c["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true, "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
        assert!(sc["capabilities"]["add"].is_null(), "{name}");
        assert!(
            c["resources"]["requests"]["cpu"].is_string(),
            "{name}: requests"
        );
        assert!(
            c["resources"]["limits"]["memory"].is_string(),
            "{name}: memory limit"
        );
        let strategy = &deployment(&objects)["spec"]["strategy"]["rollingUpdate"];
        assert_eq!(
            strategy["maxUnavailable"], 0,
            "{name}: surge before draining"
        );
    }
}

#[test]
fn the_services_the_backendconfig_the_pdb_and_the_hpa_fit_the_pods() {
    for (name, objects) in renders() {
        let ports = container_ports(&objects);
        let pod_labels = &deployment(&objects)["spec"]["template"]["metadata"]["labels"];
        let selector = &deployment(&objects)["spec"]["selector"]["matchLabels"];
        for (k, v) in selector.as_object().unwrap() {
            assert_eq!(&pod_labels[k], v, "{name}: the selector matches the pods");
        }
        let services = all_of(&objects, "Service");
        let by_component = |c: &str| {
            *services
                .iter()
                .find(|s| s["metadata"]["labels"]["app.kubernetes.io/component"] == c)
                .unwrap_or_else(|| panic!("{name}: a {c} Service"))
        };
        for (component, port_name) in [("public", "public"), ("internal", "internal")] {
            let svc = by_component(component);
            assert_eq!(
                &svc["spec"]["selector"], selector,
                "{name}: {component} selector"
            );
            let sp = svc["spec"]["ports"].as_array().unwrap();
            assert_eq!(sp.len(), 1, "{name}: the {component} Service has one port");
            assert_eq!(
                sp[0]["targetPort"], port_name,
                "{name}: {component} targetPort"
            );
            assert_eq!(sp[0]["port"], ports[port_name], "{name}: {component} port");
        }
        let internal = by_component("internal");
        assert_eq!(
            internal["spec"]["type"], "ClusterIP",
            "{name}: internal stays in-cluster"
        );
        assert!(
            internal["metadata"]["annotations"]["cloud.google.com/neg"].is_null(),
            "{name}: the internal port is never a load balancer backend"
        );
        // The callback URL NoETL's workers get is the internal Service.
        let callback = env_value(&objects, "GATEWAY_CALLBACK_URL").expect("GATEWAY_CALLBACK_URL");
        let internal_name = internal["metadata"]["name"].as_str().unwrap();
        assert_eq!(
            callback,
            format!(
                "http://{internal_name}.{NAMESPACE}.svc.cluster.local:{}",
                ports["internal"]
            ),
            "{name}"
        );

        let public = by_component("public");
        let annotations = &public["metadata"]["annotations"];
        assert_eq!(
            annotations["cloud.google.com/neg"], r#"{"ingress": true}"#,
            "{name}"
        );
        let bc = one(&objects, "BackendConfig");
        let reference: Value = serde_json::from_str(
            annotations["cloud.google.com/backend-config"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            reference["default"], bc["metadata"]["name"],
            "{name}: BackendConfig ref"
        );
        let timeout = bc["spec"]["timeoutSec"].as_u64().unwrap();
        let ping = origin_defaults().sse_ping_interval.as_secs();
        assert!(
            timeout >= 3600 && timeout > ping,
            "{name}: SSE outlives the backend timeout? {timeout}"
        );
        // The balancer must not cut what the origin is still ending spread out.
        let draining = bc["spec"]["connectionDraining"]["drainingTimeoutSec"]
            .as_u64()
            .unwrap();
        let c = container(&objects);
        let pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap();
        let drain = seconds(&env_value(&objects, "DRAIN_DELAY").unwrap());
        let grace = seconds(&env_value(&objects, "SHUTDOWN_GRACE").unwrap());
        assert!(
            draining >= pre_stop + drain + grace,
            "{name}: drainingTimeoutSec {draining} >= preStop + DRAIN_DELAY + SHUTDOWN_GRACE"
        );
        let hc = &bc["spec"]["healthCheck"];
        assert_eq!(hc["requestPath"], "/ready", "{name}");
        assert_eq!(
            hc["port"], ports["internal"],
            "{name}: health check on the internal port"
        );

        let pdb = one(&objects, "PodDisruptionBudget");
        assert_eq!(
            &pdb["spec"]["selector"]["matchLabels"], selector,
            "{name}: PDB selector"
        );
        assert_eq!(pdb["spec"]["maxUnavailable"], 1, "{name}");

        let hpa = one(&objects, "HorizontalPodAutoscaler");
        assert_eq!(hpa["apiVersion"], "autoscaling/v2");
        assert_eq!(
            hpa["spec"]["scaleTargetRef"]["name"],
            deployment(&objects)["metadata"]["name"]
        );
        let metrics = hpa["spec"]["metrics"].as_array().unwrap();
        assert!(
            metrics
                .iter()
                .any(|m| m["type"] == "Resource" && m["resource"]["name"] == "cpu"),
            "{name}: CPU"
        );
        let sse = metrics.iter().find(|m| {
            m["type"] == "Pods" && m["pods"]["metric"]["name"] == "gateway_sse_streams_open"
        });
        assert_eq!(
            sse.is_some(),
            name == "prod",
            "{name}: open SSE streams only when enabled"
        );
        assert!(
            hpa["spec"]["minReplicas"].as_u64().unwrap() >= 2,
            "{name}: a drained replica's clients have somewhere to go"
        );
    }
}

#[test]
fn the_network_policy_admits_the_internal_port_only_from_noetl_and_monitoring() {
    for (name, objects) in renders() {
        let np = one(&objects, "NetworkPolicy");
        let selector = &deployment(&objects)["spec"]["selector"]["matchLabels"];
        assert_eq!(
            &np["spec"]["podSelector"]["matchLabels"], selector,
            "{name}"
        );
        assert_eq!(np["spec"]["policyTypes"], json!(["Ingress"]), "{name}");
        let rules = np["spec"]["ingress"].as_array().unwrap();
        let for_port = |port: &str| -> Vec<&Value> {
            rules
                .iter()
                .filter(|r| {
                    r["ports"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|p| p["port"] == port)
                })
                .collect()
        };
        assert!(
            !for_port("public").is_empty(),
            "{name}: the public port is admitted"
        );
        let internal = for_port("internal");
        assert_eq!(internal.len(), 1, "{name}: one rule for the internal port");
        let from = internal[0]["from"]
            .as_array()
            .expect("the internal rule names its sources");
        let namespaces: BTreeSet<&str> = from
            .iter()
            .filter_map(|f| {
                f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].as_str()
            })
            .collect();
        let expected: BTreeSet<&str> = if name == "prod" {
            BTreeSet::from(["noetl", "monitoring"])
        } else {
            BTreeSet::from(["noetl"])
        };
        assert_eq!(
            namespaces, expected,
            "{name}: namespaces admitted to the internal port"
        );
        for f in from {
            // Either a named namespace, or the load balancer's health checkers (GKE).
            let ns_only = f["namespaceSelector"].is_object() && f["podSelector"].is_null();
            let health_checker = ["130.211.0.0/22", "35.191.0.0/16"]
                .contains(&f["ipBlock"]["cidr"].as_str().unwrap_or(""));
            assert!(ns_only || health_checker, "{name}: unexpected source {f}");
        }
        // Every rule names its ports: nothing else is open.
        for r in rules {
            assert!(!r["ports"].as_array().unwrap().is_empty(), "{name}: {r}");
        }
    }
}

#[test]
fn secrets_are_only_referenced_never_rendered() {
    let secrets = secret_settings();
    for (name, objects) in renders() {
        let env = env(&objects);
        for s in &secrets {
            let e = env
                .get(s)
                .unwrap_or_else(|| panic!("{name}: {s} is rendered"));
            assert!(e["value"].is_null(), "{name}: {s} has no plain value");
            let r = &e["valueFrom"]["secretKeyRef"];
            assert!(
                r["name"].is_string() && r["key"].is_string(),
                "{name}: {s}: {e}"
            );
        }
        if name == "prod" {
            // NATS_URL may carry credentials: in prod it is read from the Secret, which wins
            // over the default in `config`.
            assert!(env["NATS_URL"]["value"].is_null());
            assert_eq!(
                env["NATS_URL"]["valueFrom"]["secretKeyRef"]["key"],
                "nats-url"
            );
        }
        for o in &objects {
            assert_ne!(o["kind"], "Secret", "{name}");
            if o["kind"] == "ConfigMap" {
                let data = o["data"].to_string();
                for s in &secrets {
                    assert!(!data.contains(s.as_str()), "{name}: {s} in a ConfigMap");
                }
            }
        }
    }
    // A secret setting cannot be given as a plain value: the schema refuses it.
    for s in &secrets {
        let set = format!("config.{s}=a-secret-value-in-plain-sight");
        let err = try_render(&["--set", &set]).expect_err("the schema refuses a secret in config");
        assert!(
            err.contains("values don't meet the specifications of the schema"),
            "{err}"
        );
    }
    // Neither can a setting the origin does not have.
    let err = try_render(&["--set", "config.NO_SUCH_SETTING=1"]).expect_err("unknown name");
    assert!(err.contains("NO_SUCH_SETTING"), "{err}");
}

#[test]
fn the_monitoring_objects_point_at_the_internal_port_and_ship_the_files() {
    let objects = render(&["-f", &prod_values()]);
    let sm = one(&objects, "ServiceMonitor");
    let endpoints = sm["spec"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["port"], "internal");
    assert_eq!(endpoints[0]["path"], "/metrics");
    let wanted = sm["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let matching: Vec<_> = all_of(&objects, "Service")
        .into_iter()
        .filter(|s| wanted.iter().all(|(k, v)| &s["metadata"]["labels"][k] == v))
        .collect();
    assert_eq!(matching.len(), 1, "the ServiceMonitor selects one Service");
    assert_eq!(
        matching[0]["metadata"]["labels"]["app.kubernetes.io/component"],
        "internal"
    );

    let rule = one(&objects, "PrometheusRule");
    let alerts = yaml(&read(chart_dir().join("files/alerts.yaml")));
    assert_eq!(
        rule["spec"], alerts,
        "the PrometheusRule is files/alerts.yaml as it is"
    );

    let cm = one(&objects, "ConfigMap");
    assert_eq!(
        cm["metadata"]["labels"]["grafana_dashboard"], "1",
        "the sidecar's label"
    );
    let shipped: Value = serde_json::from_str(cm["data"]["noetl-gateway.json"].as_str().unwrap())
        .expect("the dashboard is JSON");
    let file: Value =
        serde_json::from_str(&read(chart_dir().join("files/grafana-dashboard.json"))).unwrap();
    assert_eq!(
        shipped, file,
        "the ConfigMap holds files/grafana-dashboard.json"
    );
}

// ---------------------------------------------------------------------------------------
// Environment names: the chart and the origin's configuration in step
// ---------------------------------------------------------------------------------------

/// Read by the origin outside its `Config` (main.rs's tracing `EnvFilter`).
const NON_CLAP_ENV: &[&str] = &["RUST_LOG"];

/// Set by the chart from `ports` and `drain`, so not accepted in `config`.
const CHART_MANAGED: &[&str] = &[
    "PUBLIC_ADDR",
    "INTERNAL_ADDR",
    "SHUTDOWN_GRACE",
    "DRAIN_DELAY",
];

fn schema() -> Value {
    serde_json::from_str(&read(chart_dir().join("values.schema.json"))).unwrap()
}

#[test]
fn every_env_name_the_chart_can_render_is_a_setting_of_the_origin() {
    let origin = origin_env_names();
    let known = |n: &str| origin.contains(n) || NON_CLAP_ENV.contains(&n);
    let schema = schema();
    let config_names: BTreeSet<String> = schema["properties"]["config"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        schema["properties"]["config"]["additionalProperties"],
        false
    );
    let secret_names: BTreeSet<String> = schema["definitions"]["secretSetting"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let unknown: Vec<_> = config_names
        .iter()
        .chain(&secret_names)
        .filter(|n| !known(n))
        .collect();
    assert!(
        unknown.is_empty(),
        "values.schema.json names settings the origin lacks: {unknown:?}"
    );

    let secrets = secret_settings();
    for s in &secrets {
        assert!(
            !config_names.contains(s),
            "{s} is a secret: not accepted in config"
        );
        assert!(secret_names.contains(s), "{s} can be read from the Secret");
    }
    for m in CHART_MANAGED {
        assert!(
            !config_names.contains(*m),
            "{m} is set by the chart, not config"
        );
    }
    // And the other way: every setting of the origin can be given through the chart.
    let not_settable: Vec<_> = origin
        .iter()
        .filter(|n| {
            !config_names.contains(*n)
                && !CHART_MANAGED.contains(&n.as_str())
                && !secrets.contains(*n)
        })
        .collect();
    assert!(
        not_settable.is_empty(),
        "settings of the origin the chart cannot set: {not_settable:?} — add them to \
         values.schema.json's config properties (or secretSetting for a secret)"
    );

    // Render with every config name set (and every name read from the Secret): each env
    // entry the chart produces is a setting.
    let mut all = serde_json::Map::new();
    for n in &config_names {
        all.insert(n.clone(), json!("x"));
    }
    let mut keys = serde_json::Map::new();
    for n in &secret_names {
        if !config_names.contains(n) {
            keys.insert(n.clone(), json!(n.to_ascii_lowercase().replace('_', "-")));
        }
    }
    let values = json!({"config": all, "secrets": {"keys": keys}});
    let file =
        std::env::temp_dir().join(format!("gateway-all-settings-{}.yaml", std::process::id()));
    fs::write(&file, values.to_string()).unwrap();
    let everything = render(&["-f", file.to_str().unwrap()]);
    fs::remove_file(&file).ok();
    let mut rendered = BTreeSet::new();
    for (_, objects) in renders().into_iter().chain([("all", everything)]) {
        rendered.extend(env(&objects).into_keys());
    }
    let strays: Vec<_> = rendered.iter().filter(|n| !known(n)).collect();
    assert!(
        strays.is_empty(),
        "the chart renders env names the origin does not read: {strays:?}"
    );
    assert!(
        rendered.len() > origin.len() / 2,
        "the all-settings render has them: {rendered:?}"
    );
}

#[test]
fn the_production_values_render_a_configuration_the_origin_accepts() {
    let objects = render(&["-f", &prod_values()]);
    let command = Config::command();
    let required: Vec<String> = command
        .get_arguments()
        .filter(|a| a.is_required_set())
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    assert!(
        required.contains(&"AUTH_AUDIENCE".to_owned()),
        "{required:?}"
    );
    let env = env(&objects);
    for r in &required {
        assert!(env.contains_key(r), "the required {r} is rendered");
    }
    // The env as flags (a Secret's value stood in for), parsed and validated as at start.
    let mut argv = vec!["origin".to_owned()];
    for (name, entry) in &env {
        if NON_CLAP_ENV.contains(&name.as_str()) {
            continue;
        }
        let arg = command
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
            .unwrap_or_else(|| panic!("{name} is no setting"));
        let value = match entry["value"].as_str() {
            Some(v) => v.to_owned(),
            None if name == "NATS_URL" => "nats://gateway:pw@nats.nats.svc:4222".to_owned(),
            None => "a-secret-from-the-secret-store".to_owned(),
        };
        argv.push(format!("--{}={value}", arg.get_long().unwrap()));
    }
    let config = Config::try_parse_from(&argv).unwrap_or_else(|e| panic!("{e}\n{argv:?}"));
    config
        .validate()
        .unwrap_or_else(|e| panic!("{e}\n{argv:?}"));
    assert_eq!(config.public_addr.to_string(), "0.0.0.0:8090");
    assert_eq!(config.internal_addr.to_string(), "0.0.0.0:8091");
    assert!(config.nats_url.is_some(), "several replicas share NATS");
    assert!(config.require_edge_assertion);
}

// ---------------------------------------------------------------------------------------
// Metric names: the alerts and the dashboard against the catalogue
// ---------------------------------------------------------------------------------------

/// The origin's metric families as PromQL names them (histograms expose `_bucket`,
/// `_count` and `_sum`; counters' samples end in `_total`): the harness's catalogue, which
/// `tests/tests/metrics.rs` holds a live origin to ([`the_charts_metric_names_are_the_origins_catalogue`]).
const HISTOGRAMS: &[&str] = &[
    "gateway_http_request_duration_seconds",
    "gateway_noetl_request_duration_seconds",
    "gateway_kv_operation_duration_seconds",
    "gateway_bus_operation_duration_seconds",
    "gateway_bridge_lag_seconds",
    "gateway_service_request_duration_seconds",
];
const OTHER_METRICS: &[&str] = &[
    "gateway_service_events_total",
    "gateway_questions_total",
    "gateway_build_info",
    "gateway_ready",
    "gateway_http_requests_in_flight",
    "gateway_noetl_up",
    "gateway_noetl_retries_total",
    "gateway_noetl_retries_over_budget_total",
    "gateway_bridge_events_total",
    "gateway_bridge_naks_total",
    "gateway_bridge_reader",
    "gateway_sse_streams_open",
    "gateway_sse_streams_total",
    "gateway_sse_streams_evicted_total",
    "gateway_sse_replayed_frames_total",
    "gateway_sse_resets_total",
    "gateway_sse_presence_deferred_total",
    "gateway_callbacks_total",
    "gateway_jwks_refreshes_total",
    "gateway_rate_limited_total",
    "gateway_connections_refused_total",
    "gateway_auth_validate_requests_total",
    "gateway_session_negative_hits_total",
    "gateway_session_validations_coalesced_total",
    "gateway_auth_busy_total",
    "gateway_revocations",
    "gateway_revocations_current",
];

#[test]
fn the_charts_metric_names_are_the_origins_catalogue() {
    use gateway_tests::harness::metrics::CATALOGUE;
    let mut from_origin: Vec<String> = CATALOGUE
        .iter()
        .map(|(name, kind)| match *kind {
            "counter" => format!("{name}_total"),
            _ => (*name).to_owned(),
        })
        .collect();
    let mut here: Vec<String> = HISTOGRAMS
        .iter()
        .chain(OTHER_METRICS)
        .map(|m| (*m).to_owned())
        .collect();
    from_origin.sort();
    here.sort();
    assert_eq!(
        here, from_origin,
        "HISTOGRAMS + OTHER_METRICS against harness::metrics::CATALOGUE"
    );
    for (name, kind) in CATALOGUE {
        assert_eq!(
            HISTOGRAMS.contains(name),
            *kind == "histogram",
            "{name} is a {kind}"
        );
    }
}

/// The catalogue family a series name belongs to, if any.
fn family(series: &str) -> Option<&'static str> {
    if let Some(m) = OTHER_METRICS.iter().find(|m| **m == series) {
        return Some(m);
    }
    HISTOGRAMS.iter().copied().find(|h| {
        series
            .strip_prefix(h)
            .is_some_and(|s| ["_bucket", "_count", "_sum"].contains(&s))
    })
}

/// Every `gateway_*` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in expr.match_indices("gateway_") {
        if expr[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            continue;
        }
        let name: String = expr[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.push(name);
    }
    out
}

/// Every PromQL expression of the dashboard (panel targets, variable queries).
fn dashboard_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "definition", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::String(s)) if s.contains("gateway_") => out.push(s.clone()),
                    _ => dashboard_exprs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

#[test]
fn the_alerts_and_the_dashboard_use_only_catalogued_metrics() {
    let alerts = yaml(&read(chart_dir().join("files/alerts.yaml")));
    let mut alert_exprs = Vec::new();
    let mut alert_names = BTreeSet::new();
    for group in alerts["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            assert!(alert_names.insert(name.to_owned()), "alert {name} twice");
            assert!(
                ["warning", "critical"]
                    .contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
                "{name}: severity"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: summary"
            );
            assert!(
                rule["for"].is_string(),
                "{name}: a `for` so one scrape does not page"
            );
            alert_exprs.push((name.to_owned(), rule["expr"].as_str().unwrap().to_owned()));
        }
    }
    for wanted in [
        "GatewayNoetlDown",
        "GatewayHigh5xxRatio",
        "GatewayHighLatencyP99",
        "GatewayBridgeLagHigh",
        "GatewayNoBridgeReader",
        "GatewayReadinessFlapping",
        "GatewayReplicaNotReady",
        "GatewayRevocationsNotCurrent",
        "GatewaySseEvictions",
        "GatewayConnectionsRefused",
    ] {
        assert!(alert_names.contains(wanted), "alert {wanted}");
    }
    let latency = &alert_exprs
        .iter()
        .find(|(n, _)| n == "GatewayHighLatencyP99")
        .unwrap()
        .1;
    assert!(
        latency.contains(r#"route!="/events""#),
        "SSE streams are not latency: {latency}"
    );

    let dashboard: Value =
        serde_json::from_str(&read(chart_dir().join("files/grafana-dashboard.json"))).unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    let mut ids = BTreeSet::new();
    for p in dashboard["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "panel id {} twice",
            p["id"]
        );
        if p["type"] != "row" {
            assert!(
                !p["targets"].as_array().unwrap().is_empty(),
                "{}: targets",
                p["title"]
            );
        }
    }

    let mut used = BTreeSet::new();
    let mut uncatalogued = Vec::new();
    for (source, expr) in alert_exprs
        .iter()
        .map(|(n, e)| (format!("alert {n}"), e.clone()))
        .chain(exprs.iter().map(|e| ("dashboard".to_owned(), e.clone())))
    {
        for m in metric_names(&expr) {
            match family(&m) {
                Some(f) => {
                    used.insert(f);
                }
                None => uncatalogued.push(format!("{source}: {m}")),
            }
        }
    }
    assert!(
        uncatalogued.is_empty(),
        "metrics not in the catalogue: {uncatalogued:#?}"
    );
    let unused: Vec<_> = HISTOGRAMS
        .iter()
        .chain(OTHER_METRICS)
        .filter(|m| !used.contains(*m))
        .collect();
    assert!(
        unused.is_empty(),
        "catalogued metrics on no panel and in no alert: {unused:?}"
    );
}
