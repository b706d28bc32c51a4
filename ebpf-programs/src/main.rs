//! Interlock's kernel programs.
//!
//! The data path, in kernel order:
//! 1. `connect4`/`connect6` (cgroup/connect*): a TCP connect to a protected
//!    destination is recorded under the socket cookie and rewritten to the
//!    agent's listener. Everything else is left alone, and so are the
//!    agent's own upstream sockets, which the agent registers by cookie
//!    (a map a workload cannot write, unlike a socket mark it can set).
//! 2. `sockops` (TCP_CONNECT_CB): once the client's source port is known, the
//!    record is copied under the client's `(address, port)`, the key the agent
//!    sees as its peer on `accept`. The agent deletes it when read, and
//!    admits the connection only if its peer socket has the record's cookie.
//! 3. `getpeername4`/`getpeername6`: the client sees the original destination
//!    as its peer, not the agent's listener. An MPTCP socket is found by its
//!    local address (only its TCP subflow went through `connect`).
//! 4. `sockops` (STATE_CB, TCP_CLOSE): the cookie record is dropped, and a
//!    connect that never got through (refused, timed out, reset while
//!    `SYN_SENT`) takes its peer record with it, so none outlives it.
//!
//! And, for the CI job a caller runs in (tracepoints, host-wide):
//! 5. `sched_process_exec`: a CI runner is known when it execs (by its
//!    comm, the program's base name).
//! 6. `sched_process_fork`: a runner's children are marked until their
//!    first exec.
//! 7. `sys_enter_execve`: at that exec, the environment the runner passes
//!    is sent to the agent: what the job cannot rewrite later, even by
//!    exec'ing itself with another environment.
#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, BPF_TCP_SYN_SENT, bpf_sock_addr, bpf_sock_ops,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie,
        bpf_ktime_get_boot_ns, bpf_probe_read_user, bpf_probe_read_user_str_bytes,
    },
    macros::{cgroup_sock_addr, map, sock_ops, tracepoint},
    maps::{Array, HashMap, LpmTrie, LruHashMap, RingBuf, lpm_trie::Key},
    programs::{SockAddrContext, SockOpsContext, TracePointContext},
};
use interlock_common::{
    AF_INET, AF_INET6, AGENT_SOCKET_ENTRIES, CONN_TABLE_ENTRIES, ConnRecord, EXEC_ENV_END,
    EXEC_ENV_VARS, ExecEnvVar, JOB_ROOT_ENTRIES, OrigDst, PORT_PREFIX_BITS, PROTECTED_ENTRIES,
    PeerKey, RUNNER_ENTRIES, RUNNER_NAME_ENTRIES, RUNNER_NAME_LEN, RedirectConfig, TargetKey,
    TargetValue, ipv4_mapped, is_ipv4_mapped,
};

/// cgroup/sock_addr programs return 1 to let the syscall proceed. Interlock
/// never refuses a connect in the kernel: refusal is the agent's decision.
const PROCEED: i32 = 1;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_MPTCP: u32 = 262;

#[map(name = "INTERLOCK_PROTECTED")]
static PROTECTED: LpmTrie<TargetKey, TargetValue> = LpmTrie::with_max_entries(PROTECTED_ENTRIES, 0);

#[map(name = "INTERLOCK_CONFIG")]
static CONFIG: Array<RedirectConfig> = Array::with_max_entries(1, 0);

#[map(name = "INTERLOCK_BY_COOKIE")]
static BY_COOKIE: LruHashMap<u64, ConnRecord> = LruHashMap::with_max_entries(CONN_TABLE_ENTRIES, 0);

#[map(name = "INTERLOCK_BY_PEER")]
static BY_PEER: LruHashMap<PeerKey, ConnRecord> =
    LruHashMap::with_max_entries(CONN_TABLE_ENTRIES, 0);

#[map(name = "INTERLOCK_ORIG_BY_LOCAL")]
static ORIG_BY_LOCAL: LruHashMap<PeerKey, OrigDst> =
    LruHashMap::with_max_entries(CONN_TABLE_ENTRIES, 0);

#[map(name = "INTERLOCK_AGENT_SOCKETS")]
static AGENT_SOCKETS: LruHashMap<u64, u8> = LruHashMap::with_max_entries(AGENT_SOCKET_ENTRIES, 0);

#[map(name = "INTERLOCK_RUNNER_NAMES")]
static RUNNER_NAMES: HashMap<[u8; RUNNER_NAME_LEN], u8> =
    HashMap::with_max_entries(RUNNER_NAME_ENTRIES, 0);

#[map(name = "INTERLOCK_RUNNERS")]
static RUNNERS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(RUNNER_ENTRIES, 0);

#[map(name = "INTERLOCK_JOB_ROOTS")]
static JOB_ROOTS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(JOB_ROOT_ENTRIES, 0);

#[map(name = "INTERLOCK_EXEC_ENV")]
static EXEC_ENV: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// Where `child_pid` sits in the `sched_process_fork` record: it moved
/// between kernels (6.x made the comms `__data_loc`), so the agent reads
/// it from the tracepoint's format and sets it at load.
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 44;
/// `envp` in `sys_enter_execve` (stable, set the same way).
#[unsafe(no_mangle)]
static EXECVE_ENVP_OFFSET: u32 = 32;

// === connect ===

#[cgroup_sock_addr(connect4)]
pub fn interlock_connect4(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, false);
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn interlock_connect6(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, true);
    PROCEED
}

#[inline(always)]
fn redirect(ctx: &SockAddrContext, v6: bool) {
    let sa = ctx.sock_addr;
    // SAFETY (here and below): `sa` is the kernel's context pointer; every
    // field is read and written with the 4-byte accesses the verifier allows.
    if unsafe { read_volatile(&(*sa).protocol) } != IPPROTO_TCP {
        return;
    }
    let Some(config) = CONFIG.get(0) else { return };
    if config.enabled == 0 {
        return;
    }

    // user_port holds the port in network order in its low 16 bits.
    let port_be = unsafe { read_volatile(&(*sa).user_port) } as u16;
    let addr = if v6 {
        read_ip6(sa)
    } else {
        ipv4_mapped(unsafe { read_volatile(&(*sa).user_ip4) }.to_ne_bytes())
    };
    let key = Key::new(
        PORT_PREFIX_BITS + 128,
        TargetKey {
            port: port_be.to_ne_bytes(),
            addr,
        },
    );
    if PROTECTED.get(key).is_none() {
        return;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if AGENT_SOCKETS.get_ptr(cookie).is_some() {
        return;
    }

    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let record = ConnRecord {
        cookie,
        orig_addr: addr,
        orig_port: u16::from_be(port_be),
        orig_family: if v6 { AF_INET6 } else { AF_INET },
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        connect_boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    // If the record cannot be stored the connection is still redirected: the
    // agent refuses connections it has no record for (fail closed).
    let _ = BY_COOKIE.insert(cookie, record, 0);

    unsafe {
        if !v6 {
            write_volatile(&mut (*sa).user_ip4, u32::from_ne_bytes(config.listener_v4));
        } else if is_ipv4_mapped(&addr) {
            // An IPv4-mapped destination on an IPv6 socket goes to the IPv4
            // listener, still mapped, so the socket stays IPv4 underneath.
            write_ip6(sa, &ipv4_mapped(config.listener_v4));
        } else {
            write_ip6(sa, &config.listener_v6);
        }
        write_volatile(&mut (*sa).user_port, config.listener_port.to_be() as u32);
    }
}

// === getpeername ===

#[cgroup_sock_addr(getpeername4)]
pub fn interlock_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, false);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn interlock_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer(&ctx, true);
    PROCEED
}

#[inline(always)]
fn restore_peer(ctx: &SockAddrContext, v6: bool) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let (addr, port) = match BY_COOKIE.get_ptr(cookie) {
        Some(record) => unsafe { ((*record).orig_addr, (*record).orig_port) },
        None => match mptcp_orig_dst(ctx, v6) {
            Some(dst) => (dst.addr, dst.port),
            None => return,
        },
    };
    let sa = ctx.sock_addr;
    unsafe {
        if v6 {
            write_ip6(sa, &addr);
        } else {
            write_volatile(
                &mut (*sa).user_ip4,
                u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
            );
        }
        write_volatile(&mut (*sa).user_port, port.to_be() as u32);
    }
}

/// An MPTCP socket shares its local address with the TCP subflow that was
/// redirected, and nothing else with it.
#[inline(always)]
fn mptcp_orig_dst(ctx: &SockAddrContext, v6: bool) -> Option<OrigDst> {
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() || unsafe { read_volatile(&(*sk).protocol) } != IPPROTO_MPTCP {
        return None;
    }
    let addr = if v6 {
        sock_src_ip6(sk)
    } else {
        ipv4_mapped(unsafe { read_volatile(&(*sk).src_ip4) }.to_ne_bytes())
    };
    let key = PeerKey {
        addr,
        // bpf_sock keeps src_port in host order.
        port: unsafe { read_volatile(&(*sk).src_port) } as u16,
        _pad: [0; 2],
    };
    ORIG_BY_LOCAL.get_ptr(key).map(|dst| unsafe { *dst })
}

// === sockops ===

#[sock_ops]
pub fn interlock_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => rekey_by_peer(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => forget(&ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn rekey_by_peer(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(record) = BY_COOKIE.get_ptr(cookie) else {
        return;
    };
    // The source port is assigned by now (TCP_CONNECT_CB runs just before
    // the SYN), so the agent cannot accept before this entry exists.
    let key = peer_key(ctx);
    let record = unsafe { *record };
    let _ = BY_PEER.insert(key, record, 0);
    let dst = OrigDst {
        addr: record.orig_addr,
        port: record.orig_port,
        _pad: [0; 2],
    };
    let _ = ORIG_BY_LOCAL.insert(key, dst, 0);
    // Ask for state callbacks so the cookie record goes when the socket does.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

/// A redirected socket is closing. Its cookie record goes; if it never got
/// past `SYN_SENT` (the listener refused it, or it timed out: the agent was
/// down) so does its peer record, which no accept will ever take. A record
/// of an established connection stays for the agent, which may accept it
/// after the client has already closed.
#[inline(always)]
fn forget(ctx: &SockOpsContext) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = BY_COOKIE.remove(cookie);
    let key = peer_key(ctx);
    let _ = ORIG_BY_LOCAL.remove(key);
    if ctx.arg(0) != BPF_TCP_SYN_SENT {
        return;
    }
    // Only this socket's own record: never one a later socket wrote.
    if let Some(record) = BY_PEER.get_ptr(key)
        && unsafe { (*record).cookie } == cookie
    {
        let _ = BY_PEER.remove(key);
    }
}

// === helpers ===

/// The socket's local `(address, port)`: the agent's peer on accept.
#[inline(always)]
fn peer_key(ctx: &SockOpsContext) -> PeerKey {
    let ops = ctx.ops;
    let addr = if ctx.family() == AF_INET as u32 {
        ipv4_mapped(unsafe { read_volatile(&(*ops).local_ip4) }.to_ne_bytes())
    } else {
        local_ip6(ops)
    };
    PeerKey {
        addr,
        // sock_ops keeps local_port in host order.
        port: unsafe { read_volatile(&(*ops).local_port) } as u16,
        _pad: [0; 2],
    }
}

// The verifier only accepts context accesses at constant offsets, so the
// four words of an IPv6 address are read and written one by one, never in a
// loop (a loop becomes pointer arithmetic on the context, which it rejects).

#[inline(always)]
fn read_ip6(sa: *mut bpf_sock_addr) -> [u8; 16] {
    unsafe {
        words_to_bytes([
            read_volatile(&(*sa).user_ip6[0]),
            read_volatile(&(*sa).user_ip6[1]),
            read_volatile(&(*sa).user_ip6[2]),
            read_volatile(&(*sa).user_ip6[3]),
        ])
    }
}

#[inline(always)]
unsafe fn write_ip6(sa: *mut bpf_sock_addr, addr: &[u8; 16]) {
    let word = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    unsafe {
        write_volatile(&mut (*sa).user_ip6[0], word(0));
        write_volatile(&mut (*sa).user_ip6[1], word(4));
        write_volatile(&mut (*sa).user_ip6[2], word(8));
        write_volatile(&mut (*sa).user_ip6[3], word(12));
    }
}

/// A separate BPF subprogram: inlined, LLVM keeps `&ctx->local_ip6[3]` in a
/// register and loads through it, which the verifier rejects ("dereference
/// of modified ctx ptr"); on its own, each load keeps its constant offset.
#[inline(never)]
fn local_ip6(ops: *mut bpf_sock_ops) -> [u8; 16] {
    unsafe {
        words_to_bytes([
            read_volatile(&(*ops).local_ip6[0]),
            read_volatile(&(*ops).local_ip6[1]),
            read_volatile(&(*ops).local_ip6[2]),
            read_volatile(&(*ops).local_ip6[3]),
        ])
    }
}

/// As [`local_ip6`], for a `bpf_sock`'s source address.
#[inline(never)]
fn sock_src_ip6(sk: *mut aya_ebpf::bindings::bpf_sock) -> [u8; 16] {
    unsafe {
        words_to_bytes([
            read_volatile(&(*sk).src_ip6[0]),
            read_volatile(&(*sk).src_ip6[1]),
            read_volatile(&(*sk).src_ip6[2]),
            read_volatile(&(*sk).src_ip6[3]),
        ])
    }
}

/// Network-order words (as the kernel stores them) to address bytes.
#[inline(always)]
fn words_to_bytes(words: [u32; 4]) -> [u8; 16] {
    let [a, b, c, d] = words.map(u32::to_ne_bytes);
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

// === CI jobs ===

#[tracepoint]
pub fn interlock_runner_fork(ctx: TracePointContext) -> u32 {
    // Runs in the forking (parent) task: its tgid is the runner's.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if unsafe { RUNNERS.get(tgid) }.is_none() {
        return 0;
    }
    let offset = unsafe { read_volatile(&FORK_CHILD_PID_OFFSET) } as usize;
    if let Ok(child) = unsafe { ctx.read_at::<i32>(offset) } {
        let _ = JOB_ROOTS.insert(child as u32, 1, 0);
    }
    0
}

#[tracepoint]
pub fn interlock_job_exec(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if unsafe { JOB_ROOTS.get(tgid) }.is_some() {
        let _ = JOB_ROOTS.remove(tgid);
        send_environment(&ctx, tgid);
    }
    0
}

/// After an exec the task's comm is the new program's base name (cut at
/// 15 bytes): a runner's is in `RUNNER_NAMES`.
#[tracepoint]
pub fn interlock_runner_exec(_ctx: TracePointContext) -> u32 {
    let Ok(comm) = bpf_get_current_comm() else {
        return 0;
    };
    if unsafe { RUNNER_NAMES.get(comm) }.is_some() {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        let _ = RUNNERS.insert(tgid, 1, 0);
    }
    0
}

/// The job root's environment, as `execve` was given it: one record per
/// variable, then an end record.
#[inline(always)]
fn send_environment(ctx: &TracePointContext, tgid: u32) {
    let offset = unsafe { read_volatile(&EXECVE_ENVP_OFFSET) } as usize;
    let Ok(envp) = (unsafe { ctx.read_at::<*const *const u8>(offset) }) else {
        return;
    };
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let mut sent: u32 = 0;
    let mut more = 0u32;
    let mut index: u32 = 0;
    while index < EXEC_ENV_VARS {
        let Ok(var) = (unsafe { bpf_probe_read_user(envp.wrapping_add(index as usize)) }) else {
            break;
        };
        if var.is_null() {
            break;
        }
        let Some(mut entry) = EXEC_ENV.reserve::<ExecEnvVar>(0) else {
            more = 1;
            break;
        };
        let record = entry.as_mut_ptr();
        unsafe {
            (*record).tgid = tgid;
            (*record).index = index as u16;
            (*record).exec_boot_ns = now;
            (*record)._pad = 0;
            let read = bpf_probe_read_user_str_bytes(var, &mut (*record).data)
                .map(|bytes| bytes.len())
                .unwrap_or(0);
            (*record).len = read as u16;
            (*record).truncated = (read + 1 >= (*record).data.len()) as u32;
        }
        entry.submit(0);
        sent += 1;
        index += 1;
    }
    if index == EXEC_ENV_VARS
        && let Ok(next) = unsafe { bpf_probe_read_user(envp.wrapping_add(index as usize)) }
    {
        more |= (!next.is_null()) as u32;
    }
    if let Some(mut entry) = EXEC_ENV.reserve::<ExecEnvVar>(0) {
        let record = entry.as_mut_ptr();
        unsafe {
            (*record).tgid = tgid;
            (*record).index = EXEC_ENV_END;
            (*record).len = sent as u16;
            (*record).exec_boot_ns = now;
            (*record).truncated = more;
            (*record)._pad = 0;
        }
        entry.submit(0);
    }
}
