//! The compute device models run on: a setting (`cpu`, `cuda`, `cuda:N`), not a code change.

use candle_core::Device;

/// Parses a device setting. `cuda` needs a build with the `cuda` feature.
pub fn parse(setting: &str) -> anyhow::Result<Device> {
    let s = setting.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                anyhow::anyhow!("bad device {setting:?}: expected cpu, cuda or cuda:N")
            })?,
        None => anyhow::bail!("bad device {setting:?}: expected cpu, cuda or cuda:N"),
    };
    if !candle_core::utils::cuda_is_available() {
        anyhow::bail!("device {setting:?} needs a build with `--features cuda`");
    }
    Ok(Device::new_cuda(ordinal)?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert!(super::parse("cpu").unwrap().is_cpu());
        assert!(super::parse("tpu").is_err());
        assert!(super::parse("cuda:x").is_err());
    }
}
