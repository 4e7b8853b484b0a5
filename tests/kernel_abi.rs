//! The kernels' PTX entry parameters against the launches in src/gpu/device.rs: a kernel
//! parameter added, dropped, reordered or resized without the launcher following would pass
//! every CPU test and corrupt memory on a GPU. The launch argument lists are read from the
//! launcher's source, so neither side is restated here. Needs NVRTC (torch's, see tests/run.sh).

mod common;

use hybridgen::gpu::{kernels, probe};

const DEVICE_RS: &str = include_str!("../src/gpu/device.rs");

/// `.param` sizes (bytes) of `.entry name` in `ptx`.
fn entry_params(ptx: &str, name: &str) -> Vec<(String, usize)> {
    let start = ptx
        .find(&format!(".entry {name}("))
        .unwrap_or_else(|| panic!("no .entry {name}"));
    let body = &ptx[start..start + ptx[start..].find(')').unwrap()];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix(".param ."))
        .map(|l| {
            let ty = l.split_whitespace().next().unwrap().to_string();
            let bits: usize = ty[1..]
                .parse()
                .unwrap_or_else(|_| panic!("param type {ty}"));
            (ty, bits / 8)
        })
        .collect()
}

/// The body of `fn name` in device.rs.
fn launcher_body(name: &str) -> &'static str {
    let start = DEVICE_RS
        .find(&format!("fn {name}("))
        .unwrap_or_else(|| panic!("no fn {name}"));
    let rest = &DEVICE_RS[start..];
    &rest[..rest.find("\n    }\n").unwrap()]
}

/// A field's type in `struct name` of device.rs.
fn field_type(strukt: &str, field: &str) -> &'static str {
    let start = DEVICE_RS.find(&format!("pub struct {strukt} {{")).unwrap();
    let body = &DEVICE_RS[start..start + DEVICE_RS[start..].find("\n}").unwrap()];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("pub {field}: ")))
        .next()
        .unwrap_or_else(|| panic!("{strukt} has no field {field}"))
        .trim_end_matches(',')
}

fn size_of_rust(ty: &str) -> usize {
    match ty {
        "u64" | "i64" | "f64" => 8,
        "u32" | "i32" | "f32" => 4,
        other => panic!("no kernel-argument size for Rust type {other}"),
    }
}

/// `(argument, size)` of each `.arg(&…)` of the launcher, in order: `a.field` from the args
/// struct, locals from the `let` that makes them (`to_i32(…)` / `as i32`).
fn launch_args(launcher: &str, strukt: &str) -> Vec<(String, usize)> {
    let body = launcher_body(launcher);
    body.split(".arg(&")
        .skip(1)
        .map(|s| s[..s.find(')').unwrap()].to_string())
        .map(|arg| {
            let size = if let Some(field) = arg.strip_prefix("a.") {
                size_of_rust(field_type(strukt, field))
            } else {
                // Whole statements, not lines: rustfmt may spread a `let` over several.
                let stmt = body
                    .split(';')
                    .map(str::trim)
                    .find(|st| {
                        st.starts_with("let") && st.split('=').next().unwrap().contains(&arg)
                    })
                    .unwrap_or_else(|| panic!("{launcher}: where is {arg} defined?"));
                assert!(
                    stmt.contains("to_i32(") || stmt.contains("as i32"),
                    "{launcher}: cannot size {arg} from `{stmt}`"
                );
                4
            };
            (arg, size)
        })
        .collect()
}

fn compatible(ptx_ty: &str, size: usize) -> bool {
    // Pointers and 64-bit integers travel as .u64/.b64/.s64; ints as .u32/.s32/.b32; floats as .f32.
    matches!(
        (ptx_ty, size),
        ("u64" | "b64" | "s64", 8) | ("u32" | "s32" | "b32", 4) | ("f32", 4)
    )
}

#[test]
fn entry_parameters_match_the_launchers() {
    if !probe::nvrtc_loadable() {
        common::skipped(
            "entry_parameters_match_the_launchers",
            "NVRTC is not loadable (put torch's nvidia/cu13/lib on LD_LIBRARY_PATH, as tests/run.sh does)",
        );
        return;
    }
    let ptx = kernels::compile("compute_80").expect("NVRTC compiles the kernels");
    let split = launch_args("split_attention", "SplitArgs");
    let merge = launch_args("merge_partials", "MergeArgs");
    for (entry, args) in [
        (kernels::SPLIT_F16, &split),
        (kernels::SPLIT_BF16, &split),
        (kernels::SPLIT_F32, &split),
        (kernels::MERGE, &merge),
    ] {
        let params = entry_params(&ptx, entry);
        assert_eq!(
            params.len(),
            args.len(),
            "{entry}: {} PTX parameters, {} launch arguments {args:?}",
            params.len(),
            args.len()
        );
        for (i, ((ty, bytes), (arg, size))) in params.iter().zip(args.iter()).enumerate() {
            assert!(
                bytes == size && compatible(ty, *size),
                "{entry} parameter {i}: PTX .{ty}, launcher passes {arg} ({size} bytes)"
            );
        }
        eprintln!("{entry}: {} parameters match", params.len());
    }
    // The block the launcher gives split_attention is the kernel's own launch bound.
    let threads: String = DEVICE_RS
        .split("const SPLIT_THREADS: u32 = ")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    for entry in [kernels::SPLIT_F16, kernels::SPLIT_BF16, kernels::SPLIT_F32] {
        let start = ptx.find(&format!(".entry {entry}(")).unwrap();
        let after = &ptx[start..];
        let maxntid = after
            .split(".maxntid ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
            .trim();
        assert_eq!(
            maxntid, threads,
            "{entry}: __launch_bounds__ {maxntid} vs SPLIT_THREADS {threads}"
        );
    }
}
