//! Generates the gRPC code from proto/ (needs `protoc`: Debian `protobuf-compiler`), and embeds
//! the git commit for `etask --version` (`ETASK_GIT_COMMIT`; "unknown" outside a git checkout,
//! e.g. a source tarball, unless the environment sets it).
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=proto/etask/v1/etask.proto");
    if let Err(e) =
        tonic_prost_build::configure().compile_protos(&["proto/etask/v1/etask.proto"], &["proto"])
    {
        panic!("cannot compile proto/etask/v1/etask.proto (is protoc installed? apt-get install protobuf-compiler): {e}");
    }
    println!("cargo:rustc-env=ETASK_GIT_COMMIT={}", git_commit());
}

fn git_commit() -> String {
    println!("cargo:rerun-if-env-changed=ETASK_GIT_COMMIT");
    if let Ok(c) = std::env::var("ETASK_GIT_COMMIT") {
        return c;
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // Rebuild when HEAD moves: HEAD itself (a branch switch) and the ref it points to (a commit).
    // Worktrees keep HEAD in their own git dir and the refs in the common one.
    // A path that does not exist would make cargo rerun this script on every build.
    let watch = |p: String| {
        if std::path::Path::new(&p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    };
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        watch(format!("{dir}/HEAD"));
    }
    if let (Some(common), Some(head_ref)) = (
        git(&["rev-parse", "--git-common-dir"]),
        git(&["symbolic-ref", "-q", "HEAD"]),
    ) {
        watch(format!("{common}/{head_ref}"));
        watch(format!("{common}/packed-refs"));
    }
    git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into())
}
