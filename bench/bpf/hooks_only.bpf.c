/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The benchmark's `ebpf-hooks` reference target: the same five cgroup hooks
 * prism-kernel attaches at the cgroup root, each with a program that returns
 * at once. What a node pays for the hooks being enabled at all, i.e. the floor
 * of any cgroup-BPF data path, measured beside the real programs.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("cgroup/connect4") int connect4(struct bpf_sock_addr *ctx) { return 1; }
SEC("cgroup/connect6") int connect6(struct bpf_sock_addr *ctx) { return 1; }
SEC("cgroup/getpeername4") int getpeername4(struct bpf_sock_addr *ctx) { return 1; }
SEC("cgroup/getpeername6") int getpeername6(struct bpf_sock_addr *ctx) { return 1; }
SEC("sockops") int pk_sockops(struct bpf_sock_ops *ctx) { return 1; }

char _license[] SEC("license") = "Apache-2.0";
