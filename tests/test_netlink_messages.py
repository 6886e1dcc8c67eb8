"""The netlink message classes prism_kernel.datapath.netlink adds to
pyroute2's (sockets.py, conntrack.py) and its parser (transport.py), on bytes
built here: no socket, no kernel, no root."""

from __future__ import annotations

import importlib
import socket
import struct

from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, inet_diag_msg

from prism_kernel.datapath.netlink import conntrack, sockets, transport

NLA_F_NESTED = 1 << 15


def _nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _diag_msg_with_storage(map_id: int, value: bytes, seq: int = 7) -> bytes:
    """A SOCK_DIAG_BY_FAMILY answer for 127.0.0.1:40000 -> 198.18.0.2:6443
    (ESTABLISHED, cookie 42) carrying one socket-storage value."""
    body = struct.pack("=BBBB", socket.AF_INET, 1, 0, 0)
    body += struct.pack(">HH", 40000, 6443)
    body += struct.pack(">4I", 0x7F000001, 0, 0, 0) + struct.pack(">4I", 0xC6120002, 0, 0, 0)
    body += struct.pack("=IQ", 0, 42) + struct.pack("=IIIII", 0, 0, 0, 0, 0)
    storage = _nla(1 | NLA_F_NESTED, _nla(2, struct.pack("=I", map_id)) + _nla(3, value))
    body += _nla(sockets.INET_DIAG_SK_BPF_STORAGES | NLA_F_NESTED, storage)
    return struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, 2, seq, 0) + body


def test_storage_attribute_is_decoded_even_after_pyroute2_used_its_own_class():
    # pyroute2 marks a class compiled when it is first used; that mark is
    # inherited, and a subclass would then decode attribute 20 as plain hex.
    inet_diag_msg().compile_nla_table()
    # Fresh classes, defined after the parent was compiled (in a test run,
    # ours may have been used already, which would hide the inherited mark).
    nl = importlib.reload(sockets)
    value = bytes(range(60))
    marshal = transport.Marshal({SOCK_DIAG_BY_FAMILY: nl._storage_diag_msg})
    (msg,) = list(marshal.parse(_diag_msg_with_storage(map_id=99, value=value)))
    assert msg["idiag_cookie"] == 42 and msg["idiag_dport"] == 6443
    stgs = msg.get_attr("INET_DIAG_SK_BPF_STORAGES")
    (st,) = stgs.get_attrs("SK_DIAG_BPF_STORAGE")
    assert st.get_attr("SK_DIAG_BPF_STORAGE_MAP_ID") == 99
    assert bytes(st.get_attr("SK_DIAG_BPF_STORAGE_MAP_VALUE")) == value


def test_storage_dump_request_carries_the_map_fd():
    req = sockets._storage_dump_req()
    req["header"]["type"] = SOCK_DIAG_BY_FAMILY
    req["header"]["flags"] = 0x301
    req["header"]["sequence_number"] = 1
    req["sdiag_family"] = socket.AF_INET
    req["sdiag_protocol"] = socket.IPPROTO_TCP
    req["idiag_states"] = 0xFFF
    req["idiag_dport"] = 6443
    req["idiag_src"] = (0, 0, 0, 0)
    req["idiag_dst"] = (0, 0, 0, 0)
    req["idiag_cookie"] = sockets.INET_DIAG_NOCOOKIE
    req["attrs"] = [("INET_DIAG_REQ_SK_BPF_STORAGES",
                     {"attrs": [("SK_DIAG_BPF_STORAGE_REQ_MAP_FD", 17)]})]
    req.encode()
    raw = bytes(req.data)
    # nlmsghdr (16) + inet_diag_req_v2 (56), then the nested attribute
    assert struct.unpack_from(">H", raw, 16 + 10)[0] == 6443  # idiag_dport, network order
    length, kind = struct.unpack_from("=HH", raw, 72)
    assert kind & ~NLA_F_NESTED == sockets.INET_DIAG_REQ_SK_BPF_STORAGES
    assert kind & NLA_F_NESTED
    inner_len, inner_kind, fd = struct.unpack_from("=HHI", raw, 76)
    assert (inner_len, inner_kind, fd) == (8, 1, 17)
    assert length == 12 and len(raw) == 84


def test_a_ctnetlink_request_is_encoded_once():
    """What is sent is exactly one message: its length field covers all of
    msg.data (a second encode() would append a copy)."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.nfnetlink.nfctsocket import IPCTNL_MSG_CT_GET

    m = conntrack._ct_msg(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_ACK, 5,
                         tuple_orig=conntrack._tcp_tuple("127.0.0.1", 40000, "127.0.0.1", 7445))
    raw = bytes(m.data)
    length, kind, flags, seq = struct.unpack_from("=IHHI", raw, 0)
    assert length == len(raw) and seq == 5 and flags == NLM_F_REQUEST | NLM_F_ACK


def test_a_refused_dump_is_an_errno_not_a_decode_error():
    """The kernel refuses a dump at its start with NLMSG_ERROR echoing only
    the request's header (NETLINK_CAP_ACK), whose type is the reply type:
    pyroute2 would decode those 16 bytes as an inet_diag_msg (struct.error)."""
    echoed = struct.pack("=IHHII", 72, SOCK_DIAG_BY_FAMILY, 0x301, 5, 0)
    ack = struct.pack("=IHHII", 16 + 4 + len(echoed), 2, 0x100, 5, 0) + struct.pack("=i", -22) + echoed
    marshal = transport.Marshal({SOCK_DIAG_BY_FAMILY: sockets._storage_diag_msg})
    (msg,) = list(marshal.parse(ack))
    assert msg["error"] == -22


def test_nlmsg_done_carries_the_dump_result():
    """An error after the dump started comes in NLMSG_DONE's payload."""
    done = struct.pack("=IHHII", 20, 3, 2, 9, 0) + struct.pack("=i", -16)
    (msg,) = list(transport.Marshal().parse(done))
    assert transport.done_errno(done, msg) == 16
    ok = struct.pack("=IHHII", 20, 3, 2, 9, 0) + struct.pack("=i", 0)
    (msg,) = list(transport.Marshal().parse(ok))
    assert transport.done_errno(ok, msg) == 0
