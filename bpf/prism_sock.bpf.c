/* SPDX-License-Identifier: Apache-2.0 */
/*
 * prism-kernel: connect-time steering of 127.0.0.1:PORT / [::1]:PORT to a
 * healthy Kubernetes API server (cgroup sock_addr programs at the cgroup v2
 * root).
 *
 * Built once, at install time, into an ELF object with BTF (clang -target bpf
 * -O2 -g; bpf/build.sh) and loaded with libbpf by a short-lived loader process
 * (prism_kernel/datapath/ebpf/loader.py). The programs read only uapi context
 * fields (struct bpf_sock_addr, struct bpf_sock_ops): no CO-RE relocations and
 * no kernel headers, so one object serves every kernel from 5.10 on. The same
 * source also compiles with bcc (-DPK_BCC), the fallback loader for a source
 * checkout without the object; the two flavours differ only in the block of
 * map declarations and accessors below.
 *
 * Programs (one per hook):
 *   connect4      BPF_CGROUP_INET4_CONNECT      127.0.0.1:PORT      -> IPv4 backend
 *   connect6      BPF_CGROUP_INET6_CONNECT      [::1]:PORT          -> IPv6 backend
 *                                              [::ffff:127.0.0.1]:PORT -> [::ffff:v4 backend]
 *   getpeername4  BPF_CGROUP_INET4_GETPEERNAME  backend -> address the socket connected to
 *   getpeername6  BPF_CGROUP_INET6_GETPEERNAME  (same, AF_INET6 sockets)
 *   sockops       BPF_CGROUP_SOCK_OPS           steered sockets only, until established:
 *                                              outcome counters (refused / SYN timeouts /
 *                                              established), suspect marks
 *
 * Only TCP connects, only to exactly the listen address and port, and only
 * in the host network namespace (netns cookie == pk_config.host_netns_cookie:
 * inside a pod 127.0.0.1:PORT is the pod's own loopback and is left alone).
 * With an empty backend set, or before the loader wrote the config, a connect
 * is left untouched (return 1): this program never fails a connect.
 *
 * Maps (all declared here; the loader pins them in /sys/fs/bpf/<instance>/maps-v<layout>):
 *   pk_config    ARRAY[1]        {host netns cookie, listen port}: written by the
 *                                daemon at install, read on every matching connect.
 *                                Cookie 0: the initial network namespace (a kernel
 *                                before 5.14 cannot tell the daemon its own cookie).
 *   pk_active    HASH[1]         key 0 -> {generation, count4, count6, buf}: the
 *                                selector. THE commit point of an update.
 *   pk_slots     HASH            key PK_SLOT_KEY(family, buf, index) -> backend.
 *   pk_counters  PERCPU_HASH     backend -> connections steered to it.
 *   pk_stats     PERCPU_ARRAY    PK_STAT_* global counters.
 *   pk_peers     SK_STORAGE      per socket {original dst, backend address as the socket
 *                                sees it, backend key}: reverse translation for
 *                                getpeername(), THE mark of a steered socket for sockops,
 *                                and how user space finds the sockets steered to a backend
 *                                (a sock_diag dump that asks for this map's values,
 *                                INET_DIAG_REQ_SK_BPF_STORAGES); freed with the socket.
 *   pk_passive   PERCPU_HASH     backend -> {refused, syn_timeouts, established}:
 *                                cumulative outcome counters of steered connects, created
 *                                by sockops on first use; never reset by updates.
 *   pk_suspect   LRU_HASH        backend -> u64 deadline (bpf_ktime_get_ns(), CLOCK_MONOTONIC):
 *                                the backend is suspect until then (in-kernel exclusion,
 *                                below). Written by sockops only, read by connect4/6; an
 *                                entry expires by its value, LRU-bounded (PK_MAX_PASSIVE),
 *                                never written by user space.
 *   pk_suspect_until ARRAY[1]    u64: the latest deadline written into pk_suspect (0: never).
 *                                connect4/6 read it first, so that while no backend is
 *                                suspect a connect costs neither a clock read nor a hash
 *                                lookup (an array lookup is inlined by the verifier).
 *
 * pk_active, pk_slots and pk_counters are hash maps created with
 * BPF_F_NO_PREALLOC on purpose: a hash update from user space builds a new
 * element and swaps it in under RCU, and the old one is freed only after a
 * grace period, so a program never sees a half-written value. An ARRAY
 * update is a plain memcpy into the live value (a concurrent reader can see
 * a torn entry), and a preallocated hash recycles an old element at once.
 *
 * Update protocol (one writer, the daemon; prism_kernel/datapath/ebpf/datapath.py
 * _write_set() follows it step by step):
 *   0. create zeroed pk_counters entries for the new backends (BPF_NOEXIST);
 *   1. write the new set into the INACTIVE buffer: pk_slots[(fam, !buf, i)];
 *   2. replace pk_active (one hash element, RCU swap) with
 *      {gen + 1, count4, count6, !buf}: from here every new connect sees the
 *      complete new set, before it the complete old one;
 *   3. delete stale slots: the old buffer and anything past the new counts;
 *   4. delete pk_counters entries of backends that left the set.
 * A connect that read the selector before step 2 and reaches a slot removed in
 * step 3 re-reads the selector (pk_pick(), at most PK_PICK_TRIES times), so it
 * picks from the new set; it never sees a mix of two sets.
 *
 * sockops (fast failover, issue 4). Runs for every TCP socket of the machine at
 * a few points; only a socket connect4/connect6 steered (it has a pk_peers entry
 * and is still connected to that backend) is acted on, and only while it is in
 * SYN_SENT: everything the failover needs from the kernel happens there.
 *   TCP_CONNECT_CB       (in tcp_connect(), SYN about to leave): OR in STATE_CB |
 *                        RTO_CB for this socket; the ones it turned on are kept in
 *                        pk_peers (cb_added).
 *   ACTIVE_ESTABLISHED_CB  established++ (the handshake completed), and the
 *                        callbacks it turned on switched off again: nothing more to see.
 *   RTO_CB in SYN_SENT   syn_timeouts++ and the backend marked suspect (every firing:
 *                        1 s after the SYN of a black-holed connect, then every
 *                        second while tcp_syn_linear_timeouts lasts, then doubling).
 *   STATE_CB -> CLOSE    refused++ and the backend marked suspect (the mark first)
 *                        when it leaves SYN_SENT after a segment came
 *                        in (segs_in > 0: the RST; a SYN-ACK would have made it
 *                        ESTABLISHED). A SYN_SENT socket closed by its owner, aborted
 *                        by SOCK_DESTROY, failed by ICMP or timed out has segs_in == 0
 *                        and is not counted.
 * The cb flags are ORed into the socket's current ones, and only the ones this
 * program added are cleared again: a flag another sock_ops program set before
 * ours ran at TCP_CONNECT_CB is kept (tested). The flags are one word per
 * socket shared by all sock_ops programs, so one that sets STATE or RTO only
 * after ours did (later in the chain at connect, or at ESTABLISHED before ours)
 * loses it at ESTABLISHED: such a program would have to set it again there.
 *
 * In-kernel exclusion of suspect backends (since layout 3). The daemon learns of a
 * refusal by polling pk_passive (100 ms); a client retries within microseconds.
 * So the kernel reacts itself:
 *   sockops  a steered connect REFUSED (the STATE_CB above) or an RTO in SYN_SENT
 *            sets pk_suspect[backend] = now + PK_SUSPECT_NS (2 s; each new failure
 *            moves the deadline on). The STATE_CB of SYN_SENT -> CLOSE runs in
 *            tcp_done() -> tcp_set_state(), before sk_state becomes CLOSE and
 *            before sk_state_change()/sk_error_report() wake the connecting
 *            process, so its immediate retry already sees the mark. (sk_err is
 *            written just before tcp_done(): a poller on another CPU could see
 *            the error a few hundred ns before the mark, but its retry still has
 *            getsockopt/close/socket/connect to do; measured: 0 of 200 retries
 *            refused, blocking and poll() clients, tests/test_datapath_suspect.py.)
 *   connect  pk_pick() draws a random slot as before; unless pk_suspect_until
 *            is in the past, it looks the backend up in pk_suspect, and when it is
 *            suspect (deadline > now) it walks the other slots of the same buffer
 *            from there, in a random direction (the suspect's share goes to both
 *            neighbours, not all to one), at most count - 1 steps, and takes the
 *            first backend that is not suspect (skipped_suspect++). All suspect:
 *            the original pick (all_suspect++): a connect is never failed and never
 *            left untouched because of the marks. A slot missing during the walk is
 *            the same race as above: the selector is re-read (PK_PICK_TRIES).
 * The mark expires by itself: the daemon removes a confirmed-dead backend from
 * the set; an unconfirmed one (a single lost SYN) is drawn again after 2 s.
 * Direct connections have no pk_peers entry: they never mark a backend.
 */

#ifdef PK_BCC
#include <uapi/linux/bpf.h>
#else
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#endif

#ifndef PK_LAYOUT
#define PK_LAYOUT 4
#endif
#define PK_MAX_BACKENDS 64 /* per family; the daemon refuses more */
#define PK_PICK_TRIES 3
#define PK_MAX_PASSIVE 1024  /* pk_passive: backends with outcome counters */
#define PK_CB_FLAGS (BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG)
#define PK_IPPROTO_TCP 6

#define PK_FAMILY4 4
#define PK_FAMILY6 6
#define PK_SLOT_KEY(fam, buf, idx) (((__u32)(fam) << 24) | ((__u32)(buf) << 16) | (__u32)(idx))

enum {
	PK_STAT_STEERED = 0,  /* connects rewritten to a backend */
	PK_STAT_NO_BACKEND,   /* matching connects left alone: empty set for the family */
	PK_STAT_RETRY,        /* selector re-read because a slot vanished under an update */
	PK_STAT_PEER_XLATE,   /* getpeername() answers rewritten */
	PK_STAT_PASSIVE_FULL, /* outcomes not counted: pk_passive full */
	PK_STAT_SKIPPED_SUSPECT, /* connects moved off a suspect pick to another backend */
	PK_STAT_ALL_SUSPECT,  /* connects steered to a suspect backend: every one was suspect */
	PK_STAT_SUSPECT_MARK, /* backends marked suspect (refused / RTO in SYN_SENT) */
	PK_STAT_SUSPECT_FAILED, /* ... and pk_suspect updates that failed */
	PK_STAT_MAX,
};

/* Addresses and ports in network byte order, as in struct bpf_sock_addr. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define pk_htonl(x) __builtin_bswap32(x)
#define pk_htons(x) __builtin_bswap16(x)
#else
#define pk_htonl(x) (x)
#define pk_htons(x) (x)
#endif
#define pk_ntohl(x) pk_htonl(x)
#define pk_ntohs(x) pk_htons(x)
#define PK_LOOPBACK4 pk_htonl(0x7f000001)  /* 127.0.0.1 */
#define PK_V4MAPPED pk_htonl(0x0000ffff)   /* ::ffff:0:0/96, third word */

struct pk_config {
	__u64 host_netns_cookie;  /* 0: the initial network namespace */
	__u32 listen_port;  /* host byte order; 0 = steering off */
	__u32 flags;        /* reserved */
};

struct pk_backend {
	__u32 addr[4];  /* IPv4 in addr[0], the rest zero */
	__u16 port;     /* network byte order */
	__u8 family;    /* PK_FAMILY4 or PK_FAMILY6 */
	__u8 pad;
};

struct pk_active {
	__u64 gen;
	__u32 count4;
	__u32 count6;
	__u32 buf;  /* 0 or 1: which half of pk_slots is live */
	__u32 pad;
};

struct pk_peer {
	__u32 orig_addr[4];     /* as the socket's family sees it (user_ip4 in [0]) */
	__u32 backend_addr[4];  /* ditto: v4-mapped for a dual-stack socket */
	__u16 orig_port;        /* network byte order */
	__u16 backend_port;
	__u32 cb_added;         /* sockops: the callback flags it turned on (was padding: layout 2-3) */
	struct pk_backend be;   /* the backend as keyed in pk_counters / pk_passive */
};

struct pk_outcome {
	__u64 refused;
	__u64 syn_timeouts;
	__u64 established;
};

/* --- maps and their accessors: the only part that differs between the two
 * loaders. Each map is used only through the pk_<map>_<op>() functions, so
 * that the program logic below is the same text for both. ---------------- */

#ifndef PK_BCC

/* libbpf: BTF-defined maps; the loader sets each map's pin path (reuse a
 * pinned map of that path, else create and pin it). */
#define PK_MAP(_type, _key, _value, _max, _flags) struct { \
		__uint(type, _type); \
		__type(key, _key); \
		__type(value, _value); \
		__uint(max_entries, _max); \
		__uint(map_flags, _flags); \
	}

PK_MAP(BPF_MAP_TYPE_ARRAY, __u32, struct pk_config, 1, 0) pk_config SEC(".maps");
PK_MAP(BPF_MAP_TYPE_HASH, __u32, struct pk_active, 1, BPF_F_NO_PREALLOC) pk_active SEC(".maps");
PK_MAP(BPF_MAP_TYPE_HASH, __u32, struct pk_backend, 4 * PK_MAX_BACKENDS, BPF_F_NO_PREALLOC) pk_slots SEC(".maps");
PK_MAP(BPF_MAP_TYPE_PERCPU_HASH, struct pk_backend, __u64, 4 * PK_MAX_BACKENDS, BPF_F_NO_PREALLOC) pk_counters SEC(".maps");
PK_MAP(BPF_MAP_TYPE_PERCPU_ARRAY, __u32, __u64, PK_STAT_MAX, 0) pk_stats SEC(".maps");
PK_MAP(BPF_MAP_TYPE_SK_STORAGE, int, struct pk_peer, 0, BPF_F_NO_PREALLOC) pk_peers SEC(".maps");
PK_MAP(BPF_MAP_TYPE_PERCPU_HASH, struct pk_backend, struct pk_outcome, PK_MAX_PASSIVE, BPF_F_NO_PREALLOC) pk_passive SEC(".maps");
PK_MAP(BPF_MAP_TYPE_LRU_HASH, struct pk_backend, __u64, PK_MAX_PASSIVE, 0) pk_suspect SEC(".maps");
PK_MAP(BPF_MAP_TYPE_ARRAY, __u32, __u64, 1, 0) pk_suspect_until SEC(".maps");

/* Run-time parameters: .rodata, the only global constant (the loader checks
 * its size), set by the loader before the load; the verifier then sees them
 * as constants. `layout` is read back: the loader refuses an object whose map
 * layout is not the one the daemon writes. */
const volatile struct {
	__u64 suspect_ns;  /* a refused / SYN-timed-out backend is avoided this long */
	__u32 layout;      /* PK_LAYOUT this object was built with */
	__u32 pad;
} pk_params = { .suspect_ns = 2000000000ULL, .layout = PK_LAYOUT };
#define PK_SUSPECT_NS (pk_params.suspect_ns)

#define PK_PROG(_sec) SEC(_sec)
/* Only helpers that are not GPL-only are called. */
char _license[] SEC("license") = "Apache-2.0";

static __always_inline void *pk_config_get(__u32 *k) { return bpf_map_lookup_elem(&pk_config, k); }
static __always_inline void *pk_active_get(__u32 *k) { return bpf_map_lookup_elem(&pk_active, k); }
static __always_inline void *pk_slots_get(__u32 *k) { return bpf_map_lookup_elem(&pk_slots, k); }
static __always_inline void *pk_counters_get(struct pk_backend *k) { return bpf_map_lookup_elem(&pk_counters, k); }
static __always_inline void *pk_stats_get(__u32 *k) { return bpf_map_lookup_elem(&pk_stats, k); }
static __always_inline void *pk_passive_get(struct pk_backend *k) { return bpf_map_lookup_elem(&pk_passive, k); }
static __always_inline long pk_passive_add(struct pk_backend *k, struct pk_outcome *v) { return bpf_map_update_elem(&pk_passive, k, v, BPF_NOEXIST); }
static __always_inline void *pk_suspect_get(struct pk_backend *k) { return bpf_map_lookup_elem(&pk_suspect, k); }
static __always_inline long pk_suspect_set(struct pk_backend *k, __u64 *v) { return bpf_map_update_elem(&pk_suspect, k, v, BPF_ANY); }
static __always_inline void *pk_suspect_until_get(__u32 *k) { return bpf_map_lookup_elem(&pk_suspect_until, k); }
static __always_inline void *pk_peers_get(struct bpf_sock *sk, __u64 flags) { return bpf_sk_storage_get(&pk_peers, sk, 0, flags); }

#else /* PK_BCC: bcc's map macros; pinned at PK_MAP_DIR unless it is a check */

#ifndef PK_SUSPECT_NS
#define PK_SUSPECT_NS 2000000000ULL
#endif

#ifdef PK_MAP_DIR
#define PK_MAP(_type, _key, _leaf, _name, _max, _flags) \
	BPF_TABLE_PINNED(_type, _key, _leaf, _name, _max, PK_MAP_DIR "/" #_name, _flags)
/* bcc's BPF_SK_STORAGE with a pin path (bcc 0.26 has no pinned variant). */
#define PK_SK_STORAGE(_name, _leaf) \
	struct _name##_table_t { \
		int key; \
		_leaf leaf; \
		void *(*sk_storage_get)(void *, void *, int); \
		int (*sk_storage_delete)(void *); \
		u32 flags; \
	}; \
	__attribute__((section("maps/sk_storage:" PK_MAP_DIR "/" #_name))) \
	struct _name##_table_t _name = { .flags = BPF_F_NO_PREALLOC }; \
	BPF_ANNOTATE_KV_PAIR(_name, int, _leaf)
#else /* compile check: private maps, nothing pinned */
#define PK_MAP(_type, _key, _leaf, _name, _max, _flags) \
	BPF_F_TABLE(_type, _key, _leaf, _name, _max, _flags)
#define PK_SK_STORAGE(_name, _leaf) BPF_SK_STORAGE(_name, _leaf)
#endif

PK_MAP("array", __u32, struct pk_config, pk_config, 1, 0);
PK_MAP("hash", __u32, struct pk_active, pk_active, 1, BPF_F_NO_PREALLOC);
PK_MAP("hash", __u32, struct pk_backend, pk_slots, 4 * PK_MAX_BACKENDS, BPF_F_NO_PREALLOC);
PK_MAP("percpu_hash", struct pk_backend, __u64, pk_counters, 4 * PK_MAX_BACKENDS, BPF_F_NO_PREALLOC);
PK_MAP("percpu_array", __u32, __u64, pk_stats, PK_STAT_MAX, 0);
PK_SK_STORAGE(pk_peers, struct pk_peer);
PK_MAP("percpu_hash", struct pk_backend, struct pk_outcome, pk_passive, PK_MAX_PASSIVE, BPF_F_NO_PREALLOC);
PK_MAP("lru_hash", struct pk_backend, __u64, pk_suspect, PK_MAX_PASSIVE, 0);
PK_MAP("array", __u32, __u64, pk_suspect_until, 1, 0);

#define PK_PROG(_sec)
#define BPF_LICENSE Apache-2.0  /* as the libbpf build: bcc's footer would declare GPL */

/* bcc rewrites map.op() calls, but not inside macros: one function each. */
static __always_inline void *pk_config_get(__u32 *k) { return pk_config.lookup(k); }
static __always_inline void *pk_active_get(__u32 *k) { return pk_active.lookup(k); }
static __always_inline void *pk_slots_get(__u32 *k) { return pk_slots.lookup(k); }
static __always_inline void *pk_counters_get(struct pk_backend *k) { return pk_counters.lookup(k); }
static __always_inline void *pk_stats_get(__u32 *k) { return pk_stats.lookup(k); }
static __always_inline void *pk_passive_get(struct pk_backend *k) { return pk_passive.lookup(k); }
static __always_inline long pk_passive_add(struct pk_backend *k, struct pk_outcome *v) { return pk_passive.insert(k, v); }
static __always_inline void *pk_suspect_get(struct pk_backend *k) { return pk_suspect.lookup(k); }
static __always_inline long pk_suspect_set(struct pk_backend *k, __u64 *v) { return pk_suspect.update(k, v); }
static __always_inline void *pk_suspect_until_get(__u32 *k) { return pk_suspect_until.lookup(k); }
static __always_inline void *pk_peers_get(struct bpf_sock *sk, __u64 flags) { return pk_peers.sk_storage_get(sk, 0, flags); }

#endif /* PK_BCC */

/* --- helpers ------------------------------------------------------------- */

static __always_inline void pk_stat_inc(__u32 which)
{
	__u64 *v = pk_stats_get(&which);

	if (v)
		*v += 1;  /* per-CPU: no atomic needed */
}

static __always_inline void pk_count_backend(struct pk_backend *be)
{
	__u64 *v = pk_counters_get(be);

	if (v)
		*v += 1;
	/* No entry: the writer removed this backend a moment ago; not counted. */
}

/* The config when this connect is ours to steer: TCP to the listen port from
 * the host network namespace. The caller has checked the address already
 * (cheapest test first: this runs for every connect on the machine). */
static __always_inline struct pk_config *pk_config_for(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0;
	struct pk_config *cfg;

	if (ctx->protocol != PK_IPPROTO_TCP)
		return NULL;
	cfg = pk_config_get(&zero);
	if (!cfg || !cfg->listen_port)
		return NULL;
	if (ctx->user_port != (__u32)pk_htons((__u16)cfg->listen_port))
		return NULL;
	/* Cookie 0: compare with the initial netns (bpf_get_netns_cookie(NULL)),
	 * as Cilium does, for a daemon that could not read its own (< 5.14). */
	if (bpf_get_netns_cookie(ctx) !=
	    (cfg->host_netns_cookie ? cfg->host_netns_cookie : bpf_get_netns_cookie(NULL)))
		return NULL;
	return cfg;
}

/* The backend is suspect: a steered connect to it was refused or timed out
 * in SYN_SENT less than PK_SUSPECT_NS ago. */
static __always_inline int pk_is_suspect(struct pk_backend *be, __u64 now)
{
	__u64 *until = pk_suspect_get(be);

	return until && *until > now;
}

/* Some backend may be suspect at `*now` (read here, only then): the latest
 * mark's deadline has not passed. The common case, no mark for a while, costs
 * one inlined array load. */
static __always_inline int pk_any_suspect(__u64 *now)
{
	__u32 zero = 0;
	__u64 *until = pk_suspect_until_get(&zero);

	if (!until || *until == 0)
		return 0;
	*now = bpf_ktime_get_ns();
	return *until > *now;
}

/* One random backend of `family` from the live buffer, copied to *out; a
 * backend that is not suspect when there is one. Returns 0, or -1 when the
 * set of that family is empty or a slot vanished under an update (*raced). */
static __always_inline int pk_pick_once(__u8 family, struct pk_backend *out, int *raced)
{
	__u32 zero = 0, count, buf, idx, step, key;
	struct pk_active *act;
	struct pk_backend *be;
	struct pk_backend cand;
	__u64 now;

	act = pk_active_get(&zero);
	if (!act)
		return -1;
	count = family == PK_FAMILY4 ? act->count4 : act->count6;
	buf = act->buf & 1;
	if (count == 0 || count > PK_MAX_BACKENDS)
		return -1;
	idx = bpf_get_prandom_u32() % count;
	key = PK_SLOT_KEY(family, buf, idx);
	be = pk_slots_get(&key);
	if (!be) {
		*raced = 1;  /* slot removed by an update after we read the selector */
		return -1;
	}
	__builtin_memcpy(out, be, sizeof(*out));
	if (!pk_any_suspect(&now) || !pk_is_suspect(out, now))
		return 0;

	/* Suspect: the other slots, walking from idx in a random direction.
	 * Bounded by the constant (the verifier walks it at most 63 times); the
	 * empty asm keeps clang from replacing i by a trip count computed from
	 * count, a value whose bounds the verifier does not follow through. */
	step = (bpf_get_prandom_u32() & 1) ? 1 : count - 1;
	for (__u32 i = 1; i < PK_MAX_BACKENDS; i++) {
		asm volatile("" : "+r"(i));
		if (i >= count)
			break;
		idx += step;
		if (idx >= count)
			idx -= count;
		key = PK_SLOT_KEY(family, buf, idx);
		be = pk_slots_get(&key);
		if (!be) {
			*raced = 1;
			return -1;
		}
		__builtin_memcpy(&cand, be, sizeof(cand));
		if (!pk_is_suspect(&cand, now)) {
			__builtin_memcpy(out, &cand, sizeof(*out));
			pk_stat_inc(PK_STAT_SKIPPED_SUSPECT);
			return 0;
		}
	}
	pk_stat_inc(PK_STAT_ALL_SUSPECT);  /* every backend suspect: the original pick */
	return 0;
}

static __always_inline int pk_pick(__u8 family, struct pk_backend *out)
{
	int raced;

#pragma unroll
	for (int i = 0; i < PK_PICK_TRIES; i++) {
		raced = 0;
		if (pk_pick_once(family, out, &raced) == 0)
			return 0;
		if (!raced)
			return -1;
		pk_stat_inc(PK_STAT_RETRY);
	}
	return -1;
}

static __always_inline void pk_remember_peer(struct bpf_sock_addr *ctx, struct pk_peer *p)
{
	struct bpf_sock *sk = ctx->sk;
	struct pk_peer *st;

	if (!sk)
		return;
	st = pk_peers_get(sk, BPF_SK_STORAGE_GET_F_CREATE);
	if (st)
		__builtin_memcpy(st, p, sizeof(*st));
}

/* --- programs ------------------------------------------------------------ */

PK_PROG("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	struct pk_backend be = {};
	struct pk_peer peer = {};

	if (ctx->user_ip4 != PK_LOOPBACK4)
		return 1;
	if (!pk_config_for(ctx))
		return 1;
	if (pk_pick(PK_FAMILY4, &be) < 0) {
		pk_stat_inc(PK_STAT_NO_BACKEND);
		return 1;
	}
	peer.orig_addr[0] = ctx->user_ip4;
	peer.orig_port = (__u16)ctx->user_port;
	peer.backend_addr[0] = be.addr[0];
	peer.backend_port = be.port;
	__builtin_memcpy(&peer.be, &be, sizeof(be));

	ctx->user_ip4 = be.addr[0];
	ctx->user_port = be.port;

	pk_remember_peer(ctx, &peer);
	pk_count_backend(&be);
	pk_stat_inc(PK_STAT_STEERED);
	return 1;
}

PK_PROG("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx)
{
	struct pk_backend be = {};
	struct pk_peer peer = {};
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1];
	__u32 w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
	__u8 family;

	if (w0 != 0 || w1 != 0)
		return 1;
	if (w2 == 0 && w3 == pk_htonl(1))
		family = PK_FAMILY6;        /* [::1]:PORT */
	else if (w2 == PK_V4MAPPED && w3 == PK_LOOPBACK4)
		family = PK_FAMILY4;        /* [::ffff:127.0.0.1]:PORT, dual-stack socket */
	else
		return 1;
	if (!pk_config_for(ctx))
		return 1;
	if (pk_pick(family, &be) < 0) {
		pk_stat_inc(PK_STAT_NO_BACKEND);
		return 1;
	}
	peer.orig_addr[2] = w2;
	peer.orig_addr[3] = w3;
	peer.orig_port = (__u16)ctx->user_port;
	if (family == PK_FAMILY4) {
		peer.backend_addr[2] = PK_V4MAPPED;
		peer.backend_addr[3] = be.addr[0];
	} else {
		peer.backend_addr[0] = be.addr[0];
		peer.backend_addr[1] = be.addr[1];
		peer.backend_addr[2] = be.addr[2];
		peer.backend_addr[3] = be.addr[3];
	}
	peer.backend_port = be.port;
	__builtin_memcpy(&peer.be, &be, sizeof(be));

	ctx->user_ip6[0] = peer.backend_addr[0];
	ctx->user_ip6[1] = peer.backend_addr[1];
	ctx->user_ip6[2] = peer.backend_addr[2];
	ctx->user_ip6[3] = peer.backend_addr[3];
	ctx->user_port = be.port;

	pk_remember_peer(ctx, &peer);
	pk_count_backend(&be);
	pk_stat_inc(PK_STAT_STEERED);
	return 1;
}

/* getpeername(): answer with the address the socket connected to, as a proxy
 * would. Only when the kernel's peer is still the backend this socket was
 * steered to (a socket that connected again elsewhere keeps its real peer). */
PK_PROG("cgroup/getpeername4")
int getpeername4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct pk_peer *p;

	if (!sk)
		return 1;
	p = pk_peers_get(sk, 0);
	if (!p)
		return 1;
	if (ctx->user_ip4 != p->backend_addr[0] || ctx->user_port != (__u32)p->backend_port)
		return 1;
	ctx->user_ip4 = p->orig_addr[0];
	ctx->user_port = p->orig_port;
	pk_stat_inc(PK_STAT_PEER_XLATE);
	return 1;
}

PK_PROG("cgroup/getpeername6")
int getpeername6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct pk_peer *p;

	if (!sk)
		return 1;
	p = pk_peers_get(sk, 0);
	if (!p)
		return 1;
	if (ctx->user_ip6[0] != p->backend_addr[0] || ctx->user_ip6[1] != p->backend_addr[1] ||
	    ctx->user_ip6[2] != p->backend_addr[2] || ctx->user_ip6[3] != p->backend_addr[3] ||
	    ctx->user_port != (__u32)p->backend_port)
		return 1;
	ctx->user_ip6[0] = p->orig_addr[0];
	ctx->user_ip6[1] = p->orig_addr[1];
	ctx->user_ip6[2] = p->orig_addr[2];
	ctx->user_ip6[3] = p->orig_addr[3];
	ctx->user_port = p->orig_port;
	pk_stat_inc(PK_STAT_PEER_XLATE);
	return 1;
}

/* --- sock_ops: outcome counters and suspect marks, in SYN_SENT ------------- */

/* The pk_peers entry of a socket this program steered and that is still
 * connected to that backend (a socket can connect again elsewhere), else NULL. */
static __always_inline struct pk_peer *pk_steered(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct pk_peer *p;

	if (!sk)
		return NULL;
	p = pk_peers_get(sk, 0);
	if (!p)
		return NULL;
	if ((__u16)pk_ntohl(skops->remote_port) != pk_ntohs(p->be.port))
		return NULL;
	if (p->be.family == PK_FAMILY4) {
		if (skops->remote_ip4 != p->be.addr[0])
			return NULL;
	} else {
		if (skops->remote_ip6[0] != p->be.addr[0] || skops->remote_ip6[1] != p->be.addr[1] ||
		    skops->remote_ip6[2] != p->be.addr[2] || skops->remote_ip6[3] != p->be.addr[3])
			return NULL;
	}
	return p;
}

static __always_inline struct pk_outcome *pk_outcome_for(struct pk_backend *be)
{
	struct pk_outcome zero = {};
	struct pk_outcome *o = pk_passive_get(be);

	if (!o) {
		pk_passive_add(be, &zero);  /* EEXIST: another CPU added it; ENOSPC: full */
		o = pk_passive_get(be);
	}

	if (!o)
		pk_stat_inc(PK_STAT_PASSIVE_FULL);
	return o;
}

/* A steered connect to `be` failed (refused, or an RTO in SYN_SENT): suspect
 * until now + PK_SUSPECT_NS, a later failure moving the deadline on. An
 * existing entry is written in place (one aligned 8-byte store): an LRU map
 * recycles a replaced element at once, under a concurrent reader's feet.
 * pk_suspect_until first, so that no connect skips the lookup of a mark that
 * is already in pk_suspect; two CPUs marking at once store deadlines
 * microseconds apart, whichever lands last is the one kept. */
static __always_inline void pk_mark_suspect(struct pk_backend *be)
{
	__u32 zero = 0;
	__u64 until = bpf_ktime_get_ns() + PK_SUSPECT_NS;
	__u64 *latest = pk_suspect_until_get(&zero);
	__u64 *cur;

	if (latest)
		*latest = until;
	cur = pk_suspect_get(be);
	if (cur) {
		*cur = until;
		pk_stat_inc(PK_STAT_SUSPECT_MARK);
		return;
	}
	if (pk_suspect_set(be, &until) == 0) {  /* BPF_ANY: another CPU may have added it */
		pk_stat_inc(PK_STAT_SUSPECT_MARK);
		return;
	}
	pk_stat_inc(PK_STAT_SUSPECT_FAILED);
}

PK_PROG("sockops")
int pk_sockops(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	struct pk_outcome *o;
	struct pk_peer *p;

	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		__u32 cur = skops->bpf_sock_ops_cb_flags;

		p = pk_steered(skops);
		if (!p)
			return 1;
		p->cb_added = PK_CB_FLAGS & ~cur;
		bpf_sock_ops_cb_flags_set(skops, cur | PK_CB_FLAGS);
		return 1;
	}
	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_RTO_CB &&
	    op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	/* Cheapest tests first: TCP_CONNECT_CB set these flags on our sockets
	 * (ACTIVE_ESTABLISHED_CB runs for every socket of the machine), and of
	 * the state changes only the one to CLOSE matters. */
	if ((skops->bpf_sock_ops_cb_flags & PK_CB_FLAGS) != PK_CB_FLAGS)
		return 1;
	if (op == BPF_SOCK_OPS_STATE_CB && skops->args[1] != BPF_TCP_CLOSE)
		return 1;
	p = pk_steered(skops);
	if (!p)
		return 1;

	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~p->cb_added);
		o = pk_outcome_for(&p->be);
		if (o)
			o->established += 1;  /* per-CPU: no atomic needed */
		return 1;
	}
	if (op == BPF_SOCK_OPS_RTO_CB) {
		if (skops->state == BPF_TCP_SYN_SENT) {
			pk_mark_suspect(&p->be);
			o = pk_outcome_for(&p->be);
			if (o)
				o->syn_timeouts += 1;
		}
		return 1;
	}
	/* BPF_SOCK_OPS_STATE_CB: args[0] old state, args[1] new state */
	if (skops->args[1] != BPF_TCP_CLOSE)
		return 1;
	if (skops->args[0] == BPF_TCP_SYN_SENT && skops->segs_in > 0) {
		pk_mark_suspect(&p->be);  /* first: the owner's retry is about to come */
		o = pk_outcome_for(&p->be);
		if (o)
			o->refused += 1;
	}
	/* Never established: switch off what TCP_CONNECT_CB switched on, or a
	 * socket that connects again (elsewhere) would keep it for life. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~p->cb_added);
	p->cb_added = 0;
	return 1;
}
