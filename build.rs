//! Puts the commit the binary is built from into `--version`, when the build has
//! one (a git checkout with git installed); otherwise the version alone.

fn main() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty());
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| !o.stdout.is_empty());
    let text = match commit {
        Some(c) if dirty => format!(" (commit {c}, with local changes)"),
        Some(c) => format!(" (commit {c})"),
        None => String::new(),
    };
    println!("cargo:rustc-env=KB_BUILD_COMMIT={text}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/index");
    println!("cargo:rerun-if-changed=.git/logs/HEAD");
    println!("cargo:rerun-if-changed=build.rs");
}
