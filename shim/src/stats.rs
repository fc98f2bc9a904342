//! Stats: runc's `events --stats` JSON turned into the cgroup metrics
//! messages containerd expects (v1 on hosts whose memory controller is on
//! cgroup v1, as on these hybrid hosts; v2 on unified hosts).

use containerd_shim::protos::cgroups::metrics as v1;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use serde_json::Value;

use crate::error::{Error, Result};

/// True when the host runs cgroup v2 only (no v1 memory controller).
pub fn unified_host() -> bool {
    !std::path::Path::new("/sys/fs/cgroup/memory").exists()
        && std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Packs runc's stats as containerd's metrics `Any`.
pub fn to_any(runc_events: &Value) -> Result<Any> {
    let data = &runc_events["data"];
    let (type_url, bytes) = if unified_host() {
        let m = to_v2(data);
        ("io.containerd.cgroups.v2.Metrics", m.write_to_bytes())
    } else {
        let m = to_v1(data);
        ("io.containerd.cgroups.v1.Metrics", m.write_to_bytes())
    };
    let value = bytes.map_err(|e| Error::Other(format!("encode metrics: {e}")))?;
    Ok(Any {
        type_url: type_url.to_string(),
        value,
        ..Default::default()
    })
}

pub fn to_v1(d: &Value) -> v1::Metrics {
    let mut m = v1::Metrics::new();
    let cpu = &d["cpu"];
    m.cpu = MessageField::some(v1::CPUStat {
        usage: MessageField::some(v1::CPUUsage {
            total: u(&cpu["usage"]["total"]),
            kernel: u(&cpu["usage"]["kernel"]),
            user: u(&cpu["usage"]["user"]),
            per_cpu: cpu["usage"]["percpu"]
                .as_array()
                .map(|a| a.iter().map(u).collect())
                .unwrap_or_default(),
            ..Default::default()
        }),
        throttling: MessageField::some(v1::Throttle {
            periods: u(&cpu["throttling"]["periods"]),
            throttled_periods: u(&cpu["throttling"]["throttledPeriods"]),
            throttled_time: u(&cpu["throttling"]["throttledTime"]),
            ..Default::default()
        }),
        ..Default::default()
    });
    let mem = &d["memory"];
    let entry = |e: &Value| {
        MessageField::some(v1::MemoryEntry {
            limit: u(&e["limit"]),
            usage: u(&e["usage"]),
            max: u(&e["max"]),
            failcnt: u(&e["failcnt"]),
            ..Default::default()
        })
    };
    let raw = &mem["raw"];
    m.memory = MessageField::some(v1::MemoryStat {
        cache: u(&mem["cache"]),
        rss: u(&raw["rss"]),
        rss_huge: u(&raw["rss_huge"]),
        mapped_file: u(&raw["mapped_file"]),
        dirty: u(&raw["dirty"]),
        writeback: u(&raw["writeback"]),
        pg_fault: u(&raw["pgfault"]),
        pg_maj_fault: u(&raw["pgmajfault"]),
        inactive_anon: u(&raw["inactive_anon"]),
        active_anon: u(&raw["active_anon"]),
        inactive_file: u(&raw["inactive_file"]),
        active_file: u(&raw["active_file"]),
        unevictable: u(&raw["unevictable"]),
        hierarchical_memory_limit: u(&raw["hierarchical_memory_limit"]),
        total_cache: u(&raw["total_cache"]),
        total_rss: u(&raw["total_rss"]),
        total_inactive_file: u(&raw["total_inactive_file"]),
        usage: entry(&mem["usage"]),
        swap: entry(&mem["swap"]),
        kernel: entry(&mem["kernel"]),
        kernel_tcp: entry(&mem["kernelTCP"]),
        ..Default::default()
    });
    m.pids = MessageField::some(v1::PidsStat {
        current: u(&d["pids"]["current"]),
        limit: u(&d["pids"]["limit"]),
        ..Default::default()
    });
    m
}

pub fn to_v2(d: &Value) -> v2::Metrics {
    let mut m = v2::Metrics::new();
    let cpu = &d["cpu"];
    m.cpu = MessageField::some(v2::CPUStat {
        usage_usec: u(&cpu["usage"]["total"]) / 1000,
        user_usec: u(&cpu["usage"]["user"]) / 1000,
        system_usec: u(&cpu["usage"]["kernel"]) / 1000,
        nr_periods: u(&cpu["throttling"]["periods"]),
        nr_throttled: u(&cpu["throttling"]["throttledPeriods"]),
        throttled_usec: u(&cpu["throttling"]["throttledTime"]) / 1000,
        ..Default::default()
    });
    let mem = &d["memory"];
    let raw = &mem["raw"];
    m.memory = MessageField::some(v2::MemoryStat {
        anon: u(&raw["anon"]),
        file: u(&raw["file"]),
        usage: u(&mem["usage"]["usage"]),
        usage_limit: u(&mem["usage"]["limit"]),
        swap_usage: u(&mem["swap"]["usage"]),
        swap_limit: u(&mem["swap"]["limit"]),
        ..Default::default()
    });
    m.pids = MessageField::some(v2::PidsStat {
        current: u(&d["pids"]["current"]),
        limit: u(&d["pids"]["limit"]),
        ..Default::default()
    });
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_runc_stats() {
        let j: Value = serde_json::from_str(
            r#"{"type":"stats","id":"c","data":{
              "cpu":{"usage":{"total":5000000,"percpu":[3000000,2000000],"kernel":1000000,"user":4000000},
                     "throttling":{"periods":3}},
              "memory":{"cache":10,"usage":{"usage":4096,"limit":8192,"max":5000,"failcnt":1},
                        "raw":{"rss":2048,"total_rss":2048}},
              "pids":{"current":2,"limit":100}}}"#,
        )
        .unwrap();
        let m = to_v1(&j["data"]);
        assert_eq!(m.cpu.usage.total, 5_000_000);
        assert_eq!(m.cpu.usage.per_cpu, vec![3_000_000, 2_000_000]);
        assert_eq!(m.memory.usage.usage, 4096);
        assert_eq!(m.memory.rss, 2048);
        assert_eq!(m.pids.current, 2);
        let m2 = to_v2(&j["data"]);
        assert_eq!(m2.cpu.usage_usec, 5000);
        assert_eq!(m2.memory.usage, 4096);
        let any = to_any(&j).unwrap();
        assert!(any.type_url.starts_with("io.containerd.cgroups.v"));
    }
}
