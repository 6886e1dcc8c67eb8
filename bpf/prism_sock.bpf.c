/* SPDX-License-Identifier: Apache-2.0 */
/*
 * prism-kernel: connect-time steering of 127.0.0.1:PORT / [::1]:PORT to a
 * healthy Kubernetes API server (cgroup sock_addr programs at the cgroup v2
 * root). Design notes: docs/design/ebpf-program.md (hooks, sock_ops, suspect
 * exclusion, the two loaders) and docs/design/ebpf-update-protocol.md (how
 * the daemon changes the set under running connects).
 *
 * Programs (one per hook):
 *   connect4      BPF_CGROUP_INET4_CONNECT      127.0.0.1:PORT          -> IPv4 backend
 *   connect6      BPF_CGROUP_INET6_CONNECT      [::1]:PORT              -> IPv6 backend
 *                                              [::ffff:127.0.0.1]:PORT -> [::ffff:v4 backend]
 *   getpeername4  BPF_CGROUP_INET4_GETPEERNAME  backend -> address the socket connected to
 *   getpeername6  BPF_CGROUP_INET6_GETPEERNAME  (same, AF_INET6 sockets)
 *   sockops       BPF_CGROUP_SOCK_OPS           steered sockets until established: their
 *                                              initial SYN RTO, outcome counters, suspect marks
 *
 * Invariants:
 *   - only TCP connects to exactly the listen address and port, from the host
 *     network namespace, are touched;
 *   - a connect is never failed: no backend (an empty set, no config yet, a
 *     pick that lost every retry) leaves it untouched (return 1);
 *   - a connect is steered to a backend of one set that was committed while
 *     it ran, never a mix of two sets (pk_pick(); the protocol and its model
 *     test: docs/design/ebpf-update-protocol.md);
 *   - user space writes pk_config, pk_commit, pk_sets, pk_slots, pk_counters
 *     (create/delete) and nothing else; pk_passive and pk_suspect are written
 *     by sockops only.
 *
 * Maps (pinned in /sys/fs/bpf/<instance>/maps-v<PK_LAYOUT>):
 *   pk_config        ARRAY[1]      {host netns cookie, listen port}
 *   pk_commit        ARRAY[1]      u64 seq: THE commit point; buffer seq & 1 is live
 *   pk_sets          ARRAY[2]      per buffer {gen, count4, count6}
 *   pk_slots         ARRAY         PK_SLOT(buf, family, i) -> {gen, backend, initial SYN RTO}
 *   pk_counters      PERCPU_HASH   backend -> connections steered to it
 *   pk_stats         PERCPU_ARRAY  PK_STAT_* global counters
 *   pk_peers         SK_STORAGE    per steered socket {original dst, backend as the socket
 *                                  sees it, backend key, SYN RTO}: getpeername(), the mark sockops
 *                                  acts on, and how the daemon finds a backend's sockets
 *   pk_passive       PERCPU_HASH   backend -> {refused, syn_timeouts, established}
 *   pk_suspect       LRU_HASH      backend -> deadline (bpf_ktime_get_ns()) it is avoided until
 *   pk_suspect_until ARRAY[1]      the latest deadline in pk_suspect (0: never)
 */

#ifdef PK_BCC
#include <uapi/linux/bpf.h>
#else
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#endif

#ifndef PK_LAYOUT
#define PK_LAYOUT 5
#endif
#define PK_MAX_BACKENDS 64 /* per family; the daemon refuses more */
#define PK_PICK_TRIES 4  /* attempts of a pick before the connect is left alone */
#define PK_MAX_PASSIVE 1024  /* pk_passive: backends with outcome counters */
#define PK_CB_FLAGS (BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG)
#define PK_IPPROTO_TCP 6
/* After a backend's mark expired, a SYN timeout cannot mark it again for
 * this many suspect windows: SYN timeouts keep one backend suspect at most
 * 1 window out of 1 + PK_SUSPECT_HOLDOFF, however often they come (any
 * local user can make them; docs/design/confirm-limit.md). */
#define PK_SUSPECT_HOLDOFF 4

#define PK_FAMILY4 4
#define PK_FAMILY6 6
/* pk_slots index: buffer-major, then family (ebpf_plan.slot_index) */
#define PK_SLOT(buf, fam, idx) ((buf) * 2 * PK_MAX_BACKENDS + ((fam) == PK_FAMILY6 ? PK_MAX_BACKENDS : 0) + (idx))

enum {
	PK_STAT_STEERED = 0,  /* connects rewritten to a backend */
	PK_STAT_NO_BACKEND,   /* matching connects left alone: empty set for the family */
	PK_STAT_RETRY,        /* pick started over: a commit came between its two reads of pk_commit */
	PK_STAT_PEER_XLATE,   /* getpeername() answers rewritten */
	PK_STAT_PASSIVE_FULL, /* outcomes not counted: pk_passive full */
	PK_STAT_SKIPPED_SUSPECT, /* connects moved off a suspect pick to another backend */
	PK_STAT_ALL_SUSPECT,  /* connects steered to a suspect backend: every one was suspect */
	PK_STAT_SUSPECT_MARK, /* backends marked suspect (refused / RTO in SYN_SENT) */
	PK_STAT_SUSPECT_FAILED, /* ... and pk_suspect updates that failed */
	PK_STAT_PICK_EXHAUSTED, /* matching connects left alone: every attempt of the pick raced a commit */
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

/* pk_sets[buf]: the set held by one buffer of pk_slots. */
struct pk_set {
	__u64 gen;     /* the pk_commit value under which this buffer is live */
	__u32 count4;
	__u32 count6;
};

/* pk_slots[PK_SLOT(buf, family, i)]. gen first: it is read before the copy. */
struct pk_slot {
	__u64 gen;             /* the pk_commit value of the set this slot belongs to */
	struct pk_backend be;
	__u32 syn_rto;         /* initial SYN RTO of a connect to be, jiffies; 0: kernel default
				* (was padding: a daemon before it writes 0) */
};

struct pk_peer {
	__u32 orig_addr[4];     /* as the socket's family sees it (user_ip4 in [0]) */
	__u32 backend_addr[4];  /* ditto: v4-mapped for a dual-stack socket */
	__u16 orig_port;        /* network byte order */
	__u16 backend_port;
	/* sockops: the callback flags it turned on (BPF_SOCK_OPS_ALL_CB_FLAGS
	 * fits 16 bits); a u32 with syn_rto 0 above it to an older program. */
	__u16 cb_added;
	__u16 syn_rto;          /* the slot's syn_rto, for BPF_SOCK_OPS_TIMEOUT_INIT */
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
PK_MAP(BPF_MAP_TYPE_ARRAY, __u32, __u64, 1, 0) pk_commit SEC(".maps");
PK_MAP(BPF_MAP_TYPE_ARRAY, __u32, struct pk_set, 2, 0) pk_sets SEC(".maps");
PK_MAP(BPF_MAP_TYPE_ARRAY, __u32, struct pk_slot, 4 * PK_MAX_BACKENDS, 0) pk_slots SEC(".maps");
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
static __always_inline void *pk_commit_get(__u32 *k) { return bpf_map_lookup_elem(&pk_commit, k); }
static __always_inline void *pk_sets_get(__u32 *k) { return bpf_map_lookup_elem(&pk_sets, k); }
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
PK_MAP("array", __u32, __u64, pk_commit, 1, 0);
PK_MAP("array", __u32, struct pk_set, pk_sets, 2, 0);
PK_MAP("array", __u32, struct pk_slot, pk_slots, 4 * PK_MAX_BACKENDS, 0);
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
static __always_inline void *pk_commit_get(__u32 *k) { return pk_commit.lookup(k); }
static __always_inline void *pk_sets_get(__u32 *k) { return pk_sets.lookup(k); }
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
	/* No entry: the writer removed this backend a moment ago; not counted.
	 * (A hash element can be handed out again at once, so a removal racing
	 * this increment can count it for the next backend added: off by one,
	 * never a steering decision.) */
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

/* pk_pick(): one backend of the set committed in pk_commit, copied out of
 * maps the daemon may be writing at the same moment. Every map here is an
 * ARRAY: elements are never freed, but a daemon's write is a copy into the
 * live element that this program can see half done. So (a seqlock read, with
 * the writer only ever writing the buffer that is not live):
 *   seq = pk_commit; use buffer seq & 1, its header and slots only when their
 *   gen is seq; copy; read pk_commit again: unchanged means no write touched
 *   what was copied, else start over (PK_STAT_RETRY).
 * The model test (tests/test_update_protocol_model.py) follows these loads
 * one by one; keep the two in step. */

#define PK_PICKED 0
#define PK_EMPTY 1   /* the committed set has no backend of the family */
#define PK_RACED 2   /* a commit came between the two reads of pk_commit */

/* Volatile: the compiler keeps exactly one load of pk_commit where it is
 * written, and the barrier keeps the copies between the two. x86-64 does not
 * reorder loads with loads; the writer's bpf() calls are ordered. */
#define pk_read_commit(p) (*(volatile __u64 *)(p))
#define pk_barrier() asm volatile("" ::: "memory")

/* Slot idx of buffer buf, when it was written under seq, copied to *out
 * and *syn_rto. */
static __always_inline int pk_copy_slot(__u32 buf, __u8 family, __u32 idx, __u64 seq,
					struct pk_backend *out, __u32 *syn_rto)
{
	__u32 key = PK_SLOT(buf, family, idx);
	struct pk_slot *slot = pk_slots_get(&key);

	if (!slot || *(volatile __u64 *)&slot->gen != seq)
		return -1;
	__builtin_memcpy(out, &slot->be, sizeof(*out));
	*syn_rto = slot->syn_rto;
	return 0;
}

/* One attempt: a random backend of `family`, or when it is suspect the next
 * one that is not, walking from it in a random direction (the suspect's share
 * goes to both neighbours). *stat: a suspect counter to bump if this attempt
 * is the one that counts. */
static __always_inline int pk_pick_once(__u64 *commit, __u8 family, struct pk_backend *out,
					__u32 *syn_rto, __u32 *stat)
{
	__u32 buf, count, idx, step, cand_rto;
	struct pk_backend cand;
	struct pk_set *set;
	__u64 seq, now;

	seq = pk_read_commit(commit);
	pk_barrier();
	buf = seq & 1;
	set = pk_sets_get(&buf);
	if (!set)
		return PK_EMPTY;
	if (*(volatile __u64 *)&set->gen != seq)
		return PK_RACED;
	count = family == PK_FAMILY4 ? set->count4 : set->count6;
	if (count == 0 || count > PK_MAX_BACKENDS) {
		pk_barrier();
		return pk_read_commit(commit) == seq ? PK_EMPTY : PK_RACED;
	}
	idx = bpf_get_prandom_u32() % count;
	if (pk_copy_slot(buf, family, idx, seq, out, syn_rto) < 0)
		return PK_RACED;
	*stat = PK_STAT_MAX;
	if (pk_any_suspect(&now) && pk_is_suspect(out, now)) {
		/* Bounded by the constant (the verifier walks it at most 63 times);
		 * the empty asm keeps clang from replacing i by a trip count
		 * computed from count, whose bounds the verifier does not follow. */
		*stat = PK_STAT_ALL_SUSPECT;  /* every backend suspect: the original pick */
		step = (bpf_get_prandom_u32() & 1) ? 1 : count - 1;
		for (__u32 i = 1; i < PK_MAX_BACKENDS; i++) {
			asm volatile("" : "+r"(i));
			if (i >= count)
				break;
			idx += step;
			if (idx >= count)
				idx -= count;
			if (pk_copy_slot(buf, family, idx, seq, &cand, &cand_rto) < 0)
				return PK_RACED;
			if (!pk_is_suspect(&cand, now)) {
				__builtin_memcpy(out, &cand, sizeof(*out));
				*syn_rto = cand_rto;
				*stat = PK_STAT_SKIPPED_SUSPECT;
				break;
			}
		}
	}
	pk_barrier();
	if (pk_read_commit(commit) != seq)
		return PK_RACED;
	return PK_PICKED;
}

/* 0 and *out, *syn_rto set, or -1 (counted): leave the connect alone. A pick loses an attempt
 * only to a commit during it, so PK_PICK_TRIES lost in a row take a writer
 * committing that often within one connect: the connect is left alone then
 * (counted), never sent to a backend read from a half-written copy. */
static __always_inline int pk_pick(__u8 family, struct pk_backend *out, __u32 *syn_rto)
{
	__u32 zero = 0, stat;
	__u64 *commit = pk_commit_get(&zero);
	int rc;

	if (!commit)
		return -1;
	for (int i = 0; i < PK_PICK_TRIES; i++) {
		stat = PK_STAT_MAX;
		rc = pk_pick_once(commit, family, out, syn_rto, &stat);
		if (rc == PK_PICKED) {
			if (stat != PK_STAT_MAX)
				pk_stat_inc(stat);
			return 0;
		}
		if (rc == PK_EMPTY) {
			pk_stat_inc(PK_STAT_NO_BACKEND);
			return -1;
		}
		pk_stat_inc(PK_STAT_RETRY);
	}
	pk_stat_inc(PK_STAT_PICK_EXHAUSTED);
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
	__u32 syn_rto = 0;

	if (ctx->user_ip4 != PK_LOOPBACK4)
		return 1;
	if (!pk_config_for(ctx))
		return 1;
	if (pk_pick(PK_FAMILY4, &be, &syn_rto) < 0)
		return 1;
	peer.orig_addr[0] = ctx->user_ip4;
	peer.orig_port = (__u16)ctx->user_port;
	peer.backend_addr[0] = be.addr[0];
	peer.backend_port = be.port;
	peer.syn_rto = (__u16)syn_rto;  /* the daemon writes at most 0xffff */
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
	__u32 syn_rto = 0;
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
	if (pk_pick(family, &be, &syn_rto) < 0)
		return 1;
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
	peer.syn_rto = (__u16)syn_rto;  /* the daemon writes at most 0xffff */
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
 * until now + PK_SUSPECT_NS, a later refusal moving the deadline on.
 * `rto`: the evidence is a SYN timeout, which any local user can make
 * (IP_TTL=1): rate-limited per backend, it never moves a mark on and marks
 * again only PK_SUSPECT_HOLDOFF windows after the last mark expired (the
 * deadline is the whole state). A real black hole is marked at its first
 * timeout and taken out of the set by the daemon within that window. A
 * refusal is the backend's own RST: never limited. An existing entry is
 * written in place (one aligned 8-byte store): an LRU map recycles a
 * replaced element at once, under a concurrent reader's feet.
 * pk_suspect_until first, so that no connect skips the lookup of a mark that
 * is already in pk_suspect; two CPUs marking at once store deadlines
 * microseconds apart, whichever lands last is the one kept. */
static __always_inline void pk_mark_suspect(struct pk_backend *be, int rto)
{
	__u32 zero = 0;
	__u64 now = bpf_ktime_get_ns();
	__u64 until = now + PK_SUSPECT_NS;
	__u64 *latest;
	__u64 *cur = pk_suspect_get(be);

	if (rto && cur && now < *cur + PK_SUSPECT_HOLDOFF * PK_SUSPECT_NS)
		return;  /* marked, or marked too recently */
	latest = pk_suspect_until_get(&zero);
	if (latest)
		*latest = until;
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

	/* The flags are one word per socket shared by every sock_ops program:
	 * OR ours in, and later clear only the ones we turned on (cb_added). */
	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		__u32 cur = skops->bpf_sock_ops_cb_flags;

		p = pk_steered(skops);
		if (!p)
			return 1;
		p->cb_added = PK_CB_FLAGS & ~cur;
		bpf_sock_ops_cb_flags_set(skops, cur | PK_CB_FLAGS);
		return 1;
	}
	/* In tcp_connect_init(), right after TCP_CONNECT_CB, for every active
	 * and passive open of the machine: the reply is the SYN's initial RTO in
	 * jiffies, 0 the kernel default. Cheapest test first: TCP_CONNECT_CB
	 * has just set these flags on our sockets (a request sock reads 0). */
	if (op == BPF_SOCK_OPS_TIMEOUT_INIT) {
		if ((skops->bpf_sock_ops_cb_flags & PK_CB_FLAGS) != PK_CB_FLAGS)
			return 1;
		p = pk_steered(skops);
		if (p && p->syn_rto)
			skops->reply = p->syn_rto;
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
		/* every firing in SYN_SENT: a black hole, first one initial RTO
		 * (syn_rto, else 1 s) after the SYN; the mark rate-limited */
		if (skops->state == BPF_TCP_SYN_SENT) {
			pk_mark_suspect(&p->be, 1);
			o = pk_outcome_for(&p->be);
			if (o)
				o->syn_timeouts += 1;
		}
		return 1;
	}
	/* BPF_SOCK_OPS_STATE_CB: args[0] old state, args[1] new state. It runs
	 * in tcp_done() before the connecting process is woken, so its retry
	 * already sees the mark. segs_in > 0: an RST came (refused); a socket
	 * closed by its owner, by SOCK_DESTROY, ICMP or a timeout has none. */
	if (skops->args[1] != BPF_TCP_CLOSE)
		return 1;
	if (skops->args[0] == BPF_TCP_SYN_SENT && skops->segs_in > 0) {
		pk_mark_suspect(&p->be, 0);  /* first: the owner's retry is about to come */
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
