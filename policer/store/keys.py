"""The Redis key layout of one namespace, as the decision library
(``policer/store/lua/lib/``) writes it; Python reads with it. Every key carries the hash
tag ``{NAMESPACE}``, so all keys of a namespace sit in one Redis Cluster slot and one
function call may touch any of them.

=====================================  =========  ==========================================
key                                    type       holds
=====================================  =========  ==========================================
``policer:{ns}:c``                     hash       every count and every value's limits and
                                                  state, one HMGET per call: ``<profile>``
                                                  / ``<profile>:<value>`` live dialogs,
                                                  ``L|<field>`` a live max and live rate
                                                  and window caps, ``T|<field>``
                                                  rate and window state, ``#confirmed``,
                                                  ``!hold``
``policer:{ns}:parents``              hash       live parents: ``<level>:<value>`` ->
                                                  parent (read when a plan is built)
``policer:{ns}:d:<dialog id>``         string     one dialog's record (policer.protocol
                                                  ``DIALOG``)
``policer:{ns}:v:<dialog id>``         hash       its variables
``policer:{ns}:n:<node>``              zset       a node's dialogs -> deadline ms
``policer:{ns}:nidx``                  set        nodes that have an ``n:<node>`` index
``policer:{ns}:nodes``                 zset       nodes holding a lease -> its end (ms)
``policer:{ns}:sigs``                  hash       attribute signature -> attribute sources
``policer:{ns}:owner``                 hash       node -> ``<instance>:<renewed ms>``
``policer:{ns}:skew``                  hash       node -> ``<skew ms>:<when>``
``policer:{ns}:epoch``                 hash       the state epoch: ``id``, ``run``
``policer:{ns}:sweep``                 string     the tick's HSCAN cursor over ``T|`` fields
``policer:{ns}:stats``                 hash       ``ended:<reason>``, ``nodes_lost``
``policer:{ns}:decisions``             hash       ``kind;result|profile,...`` -> decisions
``policer:{ns}:cdr``                   stream     call-end records (capped)
``policer:{ns}:attempts``              stream     decided attempts, one per dialog (capped)
=====================================  =========  ==========================================

Values from SIP are encoded with :func:`key_part` (the library's ``key_part`` in Lua)
before they become part of a key or a field: no ``{``, ``}``, ``:``, ``,``, ``|``,
white space or control characters survive, so no value can reach another value's
field, another namespace or another slot. A dialog is named by :func:`dialog_id`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

from policer.call import MAX_VALUE, raw_bytes, text
from policer.compile import MAX_KEY_PART

__all__ = ["MAX_DIALOG_ID", "MAX_KEY_PART", "Keys", "dialog_id", "is_dialog_id", "key_part",
           "label_from_key", "split_dialog_id", "value_from_key"]

#: Longest dialog id: two key parts of at most 200 characters and a ';'.
MAX_DIALOG_ID = 401
#: What a dialog id policer handed out is made of (key_part twice).
_DIALOG_ID = re.compile(r"[A-Za-z0-9_.@%~-]*;[A-Za-z0-9_.@%~-]*")



def value_from_key(part: str) -> str:
    """The value a :func:`key_part` came from (digests of long values stay digests).

    Bytes that are not UTF-8 come back as surrogate escapes, so two values that
    differ only there stay two values."""
    return unquote(part, errors="surrogateescape")


def label_from_key(label: str) -> str:
    """A membership label as shown (``profile=value``) from its stored form, whose
    value is a :func:`key_part`."""
    profile, eq, enc = label.partition("=")
    return f"{profile}={value_from_key(enc)}" if eq and "%" in enc else label


def key_part(value: str) -> str:
    """Encode an untrusted value for use inside a Redis key or member.

    Percent-encoding leaves only ``[A-Za-z0-9_.@-]`` and ``%``: no braces (hash
    tags), no ``:`` (our separator), no white space (``@`` stays: Call-IDs are
    ``word@host`` and most then need no encoding at all). Long values keep a prefix
    and end in ``~`` and a SHA-1 digest of the whole value, so they stay
    distinct; ``~`` itself is encoded, so no short value can spell a long one's
    key. The decision function (``policer/store/lua/lib/encoding.lua``, ``key_part``)
    encodes exactly so: this copy serves reads (``profile size VALUE``, live
    limits); a property test holds the two to the same keys.
    """
    raw = raw_bytes(value)[: MAX_VALUE * 4]
    encoded = quote(raw, safe="@").replace("~", "%7E")
    if len(encoded) <= MAX_KEY_PART:
        return encoded
    digest = hashlib.sha1(raw).hexdigest()
    return f"{encoded[:64]}~{digest}"


def dialog_id(call_id: object, from_tag: object) -> str:
    """The dialog id: Call-ID and From-tag, each encoded, joined by ``;``."""
    return f"{key_part(text(call_id))};{key_part(text(from_tag))}"


def is_dialog_id(did: str) -> bool:
    """Whether ``did`` is a dialog id policer could have handed out: ids from outside
    (an HTTP client, the command line) that are not are refused, so none names another
    key or grows one without bound."""
    return len(did) <= MAX_DIALOG_ID and _DIALOG_ID.fullmatch(did) is not None


def split_dialog_id(did: str) -> tuple[str, str]:
    """Call-ID and From-tag back from a dialog id (digests of long values stay digests)."""
    call_id, _, from_tag = did.partition(";")
    return unquote(call_id), unquote(from_tag)


@dataclass(frozen=True, slots=True)
class Keys:
    namespace: str

    @property
    def prefix(self) -> str:
        return f"policer:{{{self.namespace}}}:"

    def dialog(self, dialog_id: str) -> str:
        return f"{self.prefix}d:{dialog_id}"

    def variables(self, dialog_id: str) -> str:
        return f"{self.prefix}v:{dialog_id}"

    @property
    def counts(self) -> str:
        """The hash of every count, live limit and rate/window state."""
        return f"{self.prefix}c"

    @property
    def parents(self) -> str:
        """The hash of the live parents (:meth:`parent_field` -> parent): apart from
        :attr:`counts`, which every call reads, since only a plan's first build reads
        them."""
        return f"{self.prefix}parents"

    @property
    def fraud_events(self) -> str:
        """The fraud events (a capped stream)."""
        return f"{self.prefix}fraud"

    @property
    def fraud_counts(self) -> str:
        """The fraud events per ``rule|level|stat``."""
        return f"{self.prefix}fstats"

    @property
    def fraud_blocks(self) -> str:
        """The blocks in force (a sorted set: block field -> until)."""
        return f"{self.prefix}fblocks"

    @staticmethod
    def fraud_field(kind: str, rule: str, value: str) -> str:
        """A rule's state (``F``) or block (``B``) field of a value in :attr:`counts`."""
        return f"{kind}|{rule}:{key_part(value)}"

    @staticmethod
    def count_field(profile: str, value: str | None = None) -> str:
        """A profile's (a value's) count field in :attr:`counts`."""
        return profile if value is None else f"{profile}:{key_part(value)}"

    @staticmethod
    def value_pattern(profile: str) -> str:
        """HSCAN pattern of every value's count field of a valued profile."""
        return f"{_glob_escape(profile)}:*"

    @staticmethod
    def limit_field(profile: str, value: str) -> str:
        """A value's live limits in :attr:`counts`: its live max (none: empty), then its
        rate and window caps (``<max>,R=<max>:<per ms>:<burst>,<per>=<max>``)."""
        return f"L|{profile}:{key_part(value)}"

    #: The field of :attr:`counts` whose value changes (a new token) with every change
    #: of a live parent or a live limit: the decision library's plans, which keep the
    #: parents and live limits they were built on, re-read it with every call's counts.
    LIVE_VERSION = "^"

    @staticmethod
    def parent_field(profile: str, value: str) -> str:
        """The live parent (a value of the hierarchy level ``profile``) of ``value`` in
        :attr:`parents`."""
        return f"{profile}:{key_part(value)}"


    @staticmethod
    def state_field(profile: str, value: str | None = None) -> str:
        """A profile's (a value's) rate and window state in :attr:`counts`."""
        return "T|" + Keys.count_field(profile, value)

    def node(self, node: str) -> str:
        """The index of the dialogs a node admitted."""
        return self.node_of_part(key_part(node))

    def node_of_part(self, part: str) -> str:
        """:meth:`node` of a node named by its :func:`key_part`, as :attr:`nidx` and
        :attr:`nodes` hold it."""
        return f"{self.prefix}n:{part}"

    @property
    def nidx(self) -> str:
        """The nodes that have a :meth:`node` index (each by its key part)."""
        return f"{self.prefix}nidx"

    @property
    def nodes(self) -> str:
        """The nodes holding a lease (each by its key part) -> the end of the lease."""
        return f"{self.prefix}nodes"

    @property
    def sigs(self) -> str:
        """Attribute signatures the libraries registered -> their attribute sources."""
        return f"{self.prefix}sigs"

    @property
    def stats(self) -> str:
        return f"{self.prefix}stats"

    @property
    def decisions(self) -> str:
        return f"{self.prefix}decisions"

    @property
    def skew(self) -> str:
        """Each node's clock minus Redis's, as the node measured it: ``<ms>:<when>``."""
        return f"{self.prefix}skew"

    @property
    def cdr(self) -> str:
        return f"{self.prefix}cdr"

    @property
    def attempts(self) -> str:
        return f"{self.prefix}attempts"


def _glob_escape(s: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)
