//! NUMA placement through the raw `mbind` / `get_mempolicy` system calls (libc has no wrappers).
//!
//! Placement is best effort by design: a node that does not exist, or a kernel / container that
//! refuses the call, falls back to the local node and is reported, never an error.

use std::io;

pub const PAGE_SIZE: usize = 4096;

const MPOL_BIND: libc::c_long = 2;
const MPOL_MF_MOVE: libc::c_ulong = 1 << 1;
const MPOL_F_NODE: libc::c_ulong = 1 << 0;
const MPOL_F_ADDR: libc::c_ulong = 1 << 1;
/// Bits in the node masks we pass; covers every machine Linux supports by default.
const MAX_NODES: usize = 1024;

/// Nodes listed in `/sys/devices/system/node/online` (`"0"`, `"0-1,3"`); `[0]` when unknown.
pub fn online_nodes() -> Vec<u32> {
    std::fs::read_to_string("/sys/devices/system/node/online")
        .ok()
        .and_then(|text| parse_node_list(text.trim()))
        .filter(|nodes| !nodes.is_empty())
        .unwrap_or_else(|| vec![0])
}

fn parse_node_list(text: &str) -> Option<Vec<u32>> {
    let mut nodes = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((lo, hi)) => nodes.extend(lo.parse::<u32>().ok()?..=hi.parse::<u32>().ok()?),
            None => nodes.push(part.parse().ok()?),
        }
    }
    Some(nodes)
}

/// Bytes node `node` can still give: its free memory plus the page cache and reclaimable slab
/// the kernel would drop first (`MemFree + Active(file) + Inactive(file) + SReclaimable` of
/// `/sys/devices/system/node/nodeN/meminfo`); `None` where sysfs does not list the node. An
/// upper bound on purpose: a store write is refused only when the node is really full, since
/// memory bound to one node (`MPOL_BIND`) never falls back and a full node means the OOM killer.
pub fn node_available_bytes(node: u32) -> Option<usize> {
    let text =
        std::fs::read_to_string(format!("/sys/devices/system/node/node{node}/meminfo")).ok()?;
    parse_node_meminfo(&text)
}

fn parse_node_meminfo(text: &str) -> Option<usize> {
    // Lines read "Node 1 MemFree:   1012345 kB".
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let mut words = line.split_whitespace().skip(2);
            (words.next()? == name).then(|| words.next()?.parse::<usize>().ok())?
        })
    };
    let kib = field("MemFree:")?
        + field("Active(file):").unwrap_or(0)
        + field("Inactive(file):").unwrap_or(0)
        + field("SReclaimable:").unwrap_or(0);
    Some(kib * 1024)
}

/// The node of the CPU this thread runs on (0 when the kernel does not say).
pub fn local_node() -> u32 {
    let mut cpu: libc::c_uint = 0;
    let mut node: libc::c_uint = 0;
    // SAFETY: getcpu writes two c_uints through valid pointers; the third argument is unused.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_getcpu,
            &mut cpu as *mut libc::c_uint,
            &mut node as *mut libc::c_uint,
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    if rc == 0 {
        node
    } else {
        0
    }
}

/// Where a tier asked to live and where it actually lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePlacement {
    /// The node the caller asked for (`None`: the local node).
    pub requested: Option<u32>,
    /// The node the memory is bound to.
    pub node: u32,
    /// Why `node` differs from what was asked, if it does.
    pub fallback_reason: Option<String>,
}

impl NodePlacement {
    /// Resolves a request against the online nodes: unknown nodes fall back to the local one.
    pub fn resolve(requested: Option<u32>) -> Self {
        let online = online_nodes();
        let local = local_node();
        let local = if online.contains(&local) {
            local
        } else {
            online[0]
        };
        match requested {
            None => NodePlacement {
                requested,
                node: local,
                fallback_reason: None,
            },
            Some(n) if online.contains(&n) => NodePlacement {
                requested,
                node: n,
                fallback_reason: None,
            },
            Some(n) => NodePlacement {
                requested,
                node: local,
                fallback_reason: Some(format!(
                    "NUMA node {n} is not online (online: {online:?}); using local node {local}"
                )),
            },
        }
    }

    pub fn fell_back(&self) -> bool {
        self.fallback_reason.is_some()
    }
}

fn node_mask(node: u32) -> [libc::c_ulong; MAX_NODES / 64] {
    let mut mask = [0 as libc::c_ulong; MAX_NODES / 64];
    mask[node as usize / 64] |= 1 << (node % 64);
    mask
}

/// Binds `[addr, addr+len)` to `node`; with `move_pages`, pages already touched migrate there.
///
/// # Safety
/// `addr` must be page aligned and `[addr, addr+len)` must lie inside a mapping owned by the caller.
pub unsafe fn bind(addr: *mut u8, len: usize, node: u32, move_pages: bool) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mask = node_mask(node);
    let flags = if move_pages { MPOL_MF_MOVE } else { 0 };
    // SAFETY: the caller guarantees the range; the mask outlives the call and holds MAX_NODES bits.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as *mut libc::c_void,
            len as libc::c_ulong,
            MPOL_BIND,
            mask.as_ptr(),
            (MAX_NODES + 1) as libc::c_ulong,
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The node holding the page at `addr` (`get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR)`).
///
/// The page is faulted in by the kernel if it was never touched.
///
/// # Safety
/// `addr` must point into a mapping owned by the caller.
pub unsafe fn node_of(addr: *const u8) -> io::Result<u32> {
    let mut node: libc::c_int = -1;
    // SAFETY: get_mempolicy writes one int through `node`; no node mask is requested.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut node as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_ulong>(),
            0 as libc::c_ulong,
            addr as *const libc::c_void,
            MPOL_F_NODE | MPOL_F_ADDR,
        )
    };
    if rc == 0 && node >= 0 {
        Ok(node as u32)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The node of the page holding each of `addrs`, as `move_pages(2)` reports it in query mode
/// (no node list: nothing moves, nothing is faulted in). Per address `Ok(node)`, or `Err(errno)`:
/// for a page never touched `ENOENT` (Linux 6.1 says `EFAULT`), `EFAULT` for an address not mapped.
///
/// Why beside `node_of`: `get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR)` faults an untouched page in,
/// under the very policy being checked, so a placement check built on it cannot tell "written on
/// node n" from "allocated on n by the check". This asks the kernel about resident pages only,
/// for many pages in one call (the NUMA tests in `tests/numa.rs` read back every page of a tier).
pub fn page_nodes(addrs: &[*const u8]) -> io::Result<Vec<Result<u32, i32>>> {
    if addrs.is_empty() {
        return Ok(Vec::new());
    }
    let mut status = vec![libc::c_int::MIN; addrs.len()];
    // SAFETY: `addrs` and `status` hold `addrs.len()` entries each; with a null node list the
    // kernel only reads the addresses (never dereferenced here, so any value is harmless: an
    // unmapped one reads back as -EFAULT) and writes one status per page. pid 0 is this process.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0 as libc::c_int,
            addrs.len() as libc::c_ulong,
            addrs.as_ptr(),
            std::ptr::null::<libc::c_int>(),
            status.as_mut_ptr(),
            0 as libc::c_int,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(status
        .into_iter()
        .map(|s| if s >= 0 { Ok(s as u32) } else { Err(-s) })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_nodes_reports_touched_pages_only() {
        let len = 2 * PAGE_SIZE;
        // SAFETY: anonymous private mapping, checked below, unmapped at the end.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let p = ptr as *mut u8;
        // SAFETY: the first page of the mapping.
        unsafe { p.write(1) };
        // Some containers refuse move_pages (seccomp): nothing to check there.
        if let Ok(nodes) = page_nodes(&[p, p.wrapping_add(PAGE_SIZE)]) {
            let touched = nodes[0].expect("a written page is resident");
            assert!(online_nodes().contains(&touched), "node {touched}");
            assert!(
                matches!(nodes[1], Err(libc::ENOENT | libc::EFAULT)),
                "an untouched page has no node: {:?}",
                nodes[1]
            );
        }
        // SAFETY: ptr/len from the mmap above.
        unsafe { libc::munmap(ptr, len) };
    }

    #[test]
    fn parses_node_meminfo() {
        let text = "Node 1 MemTotal:        1048576 kB\nNode 1 MemFree:          900000 kB\n\
                    Node 1 Active(file):        1000 kB\nNode 1 Inactive(file):      2000 kB\n\
                    Node 1 SReclaimable:         500 kB\n";
        assert_eq!(parse_node_meminfo(text), Some(903_500 * 1024));
        assert_eq!(parse_node_meminfo("Node 0 MemTotal: 5 kB\n"), None);
        // This machine's own node 0, where sysfs has it.
        if let Some(bytes) = node_available_bytes(0) {
            assert!(bytes > 0);
        }
    }

    #[test]
    fn parses_node_lists() {
        assert_eq!(parse_node_list("0"), Some(vec![0]));
        assert_eq!(parse_node_list("0-2,5"), Some(vec![0, 1, 2, 5]));
        assert_eq!(parse_node_list("x"), None);
    }

    #[test]
    fn missing_node_falls_back_to_local() {
        let p = NodePlacement::resolve(Some(999));
        assert!(p.fell_back());
        assert!(online_nodes().contains(&p.node));
        let ok = NodePlacement::resolve(Some(online_nodes()[0]));
        assert!(!ok.fell_back());
    }
}
