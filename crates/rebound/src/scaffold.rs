//! `rebound new`: a guest crate from a template bundled in this binary, ready for
//! `cargo build` (debug or release) from any directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};

/// What `src/main.rs` starts as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Template {
    /// Two tasks under the dispatcher, handing work over through a queue.
    #[default]
    Hello,
    /// A TCP echo server on the network device, one task per client.
    Echo,
}

#[derive(Args, Debug)]
pub struct NewArgs {
    /// The guest's crate name (letters, digits, '_' and '-', starting with a letter).
    name: String,
    /// Directory to create (default: ./NAME); it must not exist or be empty.
    #[arg(long, value_name = "DIR")]
    path: Option<PathBuf>,
    /// What the guest does at first.
    #[arg(long, value_enum, default_value_t = Template::Hello)]
    template: Template,
    /// The SDK (crates/guest of a Rebound checkout) to build against [default: the one this
    /// binary was built from, if it is still there].
    #[arg(long, value_name = "DIR", conflicts_with = "sdk_git")]
    sdk_path: Option<PathBuf>,
    /// Build against the SDK in this git repository instead of a local path.
    #[arg(long, value_name = "URL")]
    sdk_git: Option<String>,
}

const CARGO_TOML: &str = include_str!("../templates/guest/Cargo.toml.in");
const BUILD_RS: &str = include_str!("../templates/guest/build.rs");
const README: &str = include_str!("../templates/guest/README.md.in");
const GITIGNORE: &str = include_str!("../templates/guest/gitignore");
const HELLO: &str = include_str!("../templates/guest/hello.rs");
const ECHO: &str = include_str!("../templates/guest/echo.rs");

/// The SDK this binary was built with, where it was built.
const BUILT_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../guest");

/// A crate name Cargo accepts and that names the binary as given.
fn check_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && name.len() <= 64;
    if !ok {
        bail!(
            "{name:?} is not a usable crate name: use letters, digits, '_' and '-', starting \
             with a letter (at most 64)"
        );
    }
    Ok(())
}

/// Whether `dir` is the rebound-guest SDK.
fn is_sdk(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml"))
        .is_ok_and(|t| t.lines().any(|l| l.trim() == "name = \"rebound-guest\""))
}

/// The dependency's source, as TOML inline-table entries.
fn sdk_source(args: &NewArgs) -> Result<String> {
    if let Some(url) = &args.sdk_git {
        if url.contains('"') || url.contains('\\') {
            bail!("--sdk-git {url:?}: quotes and backslashes are not allowed in the URL");
        }
        return Ok(format!("git = \"{url}\""));
    }
    let (dir, given) = match &args.sdk_path {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(BUILT_SDK), false),
    };
    let dir = dir.canonicalize().ok().filter(|d| is_sdk(d));
    let Some(dir) = dir else {
        if given {
            bail!(
                "--sdk-path {}: not the rebound-guest SDK (crates/guest of a Rebound checkout)",
                args.sdk_path.as_deref().unwrap_or(Path::new("")).display()
            );
        }
        bail!(
            "the SDK this binary was built from ({BUILT_SDK}) is not there any more: give \
             --sdk-path (crates/guest of a Rebound checkout) or --sdk-git URL"
        );
    };
    let text = dir.to_string_lossy();
    if text.contains('"') || text.contains('\\') {
        bail!("the SDK's path {text:?} cannot be written in Cargo.toml (quotes or backslashes)");
    }
    Ok(format!("path = \"{text}\""))
}

fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    vars.iter().fold(template.to_string(), |t, (k, v)| {
        t.replace(&format!("{{{{{k}}}}}"), v)
    })
}

/// Creates the guest crate; returns its directory and the command line that runs it once built.
pub fn create(args: &NewArgs) -> Result<(PathBuf, String)> {
    check_name(&args.name)?;
    let dir = args
        .path
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    match std::fs::read_dir(&dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{} exists and is not empty: choose another --path",
                    dir.display()
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    }
    let sdk = sdk_source(args)?;
    let (main, run_args) = match args.template {
        Template::Hello => (HELLO, " --args \"count=20\""),
        Template::Echo => (ECHO, " --publish 127.0.0.1:7000:7"),
    };
    let vars = [
        ("name", args.name.as_str()),
        ("sdk", sdk.as_str()),
        ("run_args", run_args),
    ];
    let files = [
        ("Cargo.toml", fill(CARGO_TOML, &vars)),
        ("build.rs", BUILD_RS.to_string()),
        ("README.md", fill(README, &vars)),
        (".gitignore", GITIGNORE.to_string()),
        ("src/main.rs", fill(main, &vars)),
    ];
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let run = format!(
        "rebound run {}{run_args}",
        dir.join("target/release").join(&args.name).display()
    );
    Ok((dir, run))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cargo_would_refuse_are_refused() {
        for bad in ["", "1abc", "a b", "a/b", "../x", "a\"b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["hello", "my-guest", "g_2"] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn every_placeholder_is_filled() {
        let vars = [("name", "g"), ("sdk", "path = \"/s\""), ("run_args", "")];
        for t in [CARGO_TOML, README, HELLO, ECHO] {
            let out = fill(t, &vars);
            assert!(!out.contains("{{"), "{out}");
        }
    }
}
