//! scratch
#[cfg(test)]
mod tests {
    use crate::cuda::nvrtc::{compile_part, KernelPart, Target};
    #[test]
    fn dump() {
        for arch in ["sm_80", "sm_89", "sm_90"] {
            for part in [
                KernelPart::Dtype("f32"),
                KernelPart::Dtype("bf16"),
                KernelPart::Common,
            ] {
                let c = compile_part(&Target::Cubin(arch.into()), part).unwrap();
                let name = match part {
                    KernelPart::Dtype(d) => d,
                    _ => "common",
                };
                std::fs::write(format!("/tmp/sass/{arch}-{name}.cubin"), &c.cubin).unwrap();
            }
        }
    }
}
