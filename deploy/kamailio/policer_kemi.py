"""KEMI routing script for policer (kemi.cfg: ``cfgengine "python"``).

The same stateful proxy as kamailio.cfg + policer.cfg, routed in Python:

* initial INVITE: policer admits (relay to POLICER_SIP_UPSTREAM with dialog
  tracking; a call with a max duration is ended with a BYE to each side when it
  reaches it, released as duration_cap) or rejects (reply with the decision's code,
  reason, Retry-After);
* with POLICER_GATEWAYS (run: the dispatcher's list, kemi.cfg WITH_GATEWAYS) an
  admitted INVITE goes to the first gateway of set 1, in priority order, that has room
  under policer's egress limits (the first attempt decided with the admit, one store
  call per further attempt); a gateway that fails (5xx, 408) is left for the next
  one; none left: the gateway limit's reject;
* in-dialog requests follow the Record-Route set;
* 401/407 from the upstream: answered once with uac_auth() when
  POLICER_UPSTREAM_AUTH_USER is set (same dialog, counted once);
* dialog events (``event_callback``) are queued (Kamailio's ``mqueue``), never
  applied in a SIP worker: confirm on an answer, release on an end;
* ``ksr_policer_timer`` (rtimer, every 100 ms, a process of its own): the queued
  events in batches (one store call each), and once a second the engine's tick
  (lease, lost nodes, library reload, operations the store refused, policy file
  changes); ``mod_init`` starts the node.

app_python3 imports this file as a module named after it (do not name it like a
package it imports), calls ``mod_init()`` once before Kamailio forks, then the
``ksr_*`` methods of the object it returned. Every callback KEMI may call is
defined here: a missing one breaks later calls. An exception never escapes a
callback: it is logged with the Call-ID and the request is still answered.
"""

from __future__ import annotations

import os
import sys
import traceback

# this script's directory, for the shared path set-up (app_python3 loads us by path)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import policer_paths

policer_paths.add_paths()

import KSR  # type: ignore[import-not-found]  # noqa: E402  (provided by app_python3)

from policer.adapters import kamailio as policer_kamailio  # noqa: E402

OK = 1


class PolicerKemi:
    def __init__(self) -> None:
        self.upstream = os.environ.get("POLICER_SIP_UPSTREAM", "sip:127.0.0.1:5070")
        self.auth_user = os.environ.get("POLICER_UPSTREAM_AUTH_USER", "")
        self.auth_password = os.environ.get("POLICER_UPSTREAM_AUTH_PASSWORD", "")
        self.auth_realm = os.environ.get("POLICER_UPSTREAM_AUTH_REALM", "")
        rr = os.environ.get("POLICER_RECORD_ROUTE", "").removeprefix("sip:")
        self.record_route = rr
        self.gateways = bool(os.environ.get("POLICER_GATEWAYS"))

    def child_init(self, rank: int) -> int:
        return 0

    # ------------------------------------------------------------------ requests

    def ksr_request_route(self, msg: object) -> int:
        try:
            self.route_request()
        except Exception:
            self.on_exception("request_route")
            if not KSR.is_ACK():
                try:
                    KSR.sl.send_reply(500, "Server Error")
                except Exception:
                    self.on_exception("request_route reply")
        return OK

    def route_request(self) -> None:
        if KSR.maxfwd.process_maxfwd(10) < 0:
            KSR.sl.send_reply(483, "Too Many Hops")
            return
        if KSR.sanity.sanity_check(17895, 7) < 0:
            KSR.warn(f"malformed SIP request from {KSR.pv.get('$si')}\n")
            return

        if KSR.is_CANCEL():
            if KSR.tm.t_check_trans() > 0:
                self.relay()
            return

        # retransmissions of requests being processed
        if not KSR.is_ACK():
            if KSR.tmx.t_precheck_trans() > 0:
                KSR.tm.t_check_trans()
                return
            if KSR.tm.t_check_trans() == 0:
                return

        if KSR.siputils.has_totag() > 0:
            self.route_within_dialog()
            return

        # initial requests
        KSR.hdr.remove("Route")
        if KSR.is_method_in("IS"):  # INVITE, SUBSCRIBE
            if self.record_route:  # a load balancer's shared address (POLICER_RECORD_ROUTE)
                KSR.rr.record_route_advertised_address(self.record_route)
            else:
                KSR.rr.record_route()

        if KSR.is_INVITE():
            # the first gateway of set 1 in priority order: $du, packed with the call's
            # attributes (the admit takes it, or says it is full)
            if self.gateways and KSR.dispatcher.ds_select_dst(1, 8) < 0:
                KSR.sl.send_reply(503, "No Gateway")
                return
            verdict = policer_kamailio.admit_current()
            if not verdict.admitted:
                policer_kamailio.reject_current(verdict)
                return
            # dialog tracking; a call with a max duration is ended by the proxy then
            policer_kamailio.manage_current(verdict)
            # the call's attributes, for `policer reconcile` if Redis ever loses the call
            KSR.pv.sets("$dlg_var(policer_call)", verdict.call_json)
            if self.gateways:
                self.to_gateway(verdict.egress)
                return

        KSR.setdsturi(self.upstream)
        self.relay()

    def to_gateway(self, first: policer_kamailio.EgressResult | None) -> None:
        """The admitted INVITE to the first gateway of set 1 (priority order) with room;
        none: the gateway limit's reject. ``first``: $du as the admit decided it (full:
        the next ones are asked; None: not decided, $du is asked first)."""
        if first is None:
            r = self.gateway_with_room()
        else:
            r = first
            while not r.taken and KSR.dispatcher.ds_next_dst() > 0:
                r = policer_kamailio.egress_current()
        if r.taken:
            self.relay()
            return
        self.reply_full(r, KSR.sl.send_reply)
        policer_kamailio.release_current("failed")

    def gateway_with_room(self) -> policer_kamailio.EgressResult:
        """$du if it has room for the call, else the next gateway that has
        (ds_next_dst): the last attempt's answer."""
        r = policer_kamailio.egress_current()
        while not r.taken and KSR.dispatcher.ds_next_dst() > 0:
            r = policer_kamailio.egress_current()
        return r

    @staticmethod
    def reply_full(r: policer_kamailio.EgressResult, send: object) -> None:
        if r.retry_after is not None:
            KSR.hdr.append_to_reply(f"Retry-After: {r.retry_after}\r\n")
        code = r.code if 300 <= r.code <= 699 else 503
        send(code, r.reason)  # type: ignore[operator]

    def route_within_dialog(self) -> None:
        # a BYE for a dialog another (perhaps dead) proxy set up: still release it
        if KSR.is_BYE() and KSR.dialog.is_known_dlg() < 0:
            policer_kamailio.release_unknown()
        if KSR.rr.loose_route() > 0:
            self.relay()
            return
        if KSR.is_ACK():
            if KSR.tm.t_check_trans() > 0:
                KSR.tm.t_relay()
            return
        KSR.sl.send_reply(404, "Not here")

    def relay(self) -> None:
        initial_invite = KSR.is_INVITE() and KSR.siputils.has_totag() < 0
        if initial_invite:
            KSR.tm.t_on_failure("ksr_failure_upstream")
        if KSR.tm.t_relay() < 0:
            if initial_invite:
                policer_kamailio.release_current("failed")
            KSR.sl.sl_reply_error()

    # ------------------------------------------------------------------ tm

    def ksr_failure_upstream(self, msg: object) -> int:
        try:
            if KSR.tm.t_is_canceled() > 0:
                return OK
            if self.auth_user and KSR.tm.t_check_status("401|407") > 0:
                # Trunk authentication: answer the upstream's challenge once. Same
                # Call-ID and From-tag, CSeq + 1: still one dialog, one admission.
                KSR.pv.sets("$avp(policer_auth_user)", self.auth_user)
                KSR.pv.sets("$avp(policer_auth_password)", self.auth_password)
                KSR.pv.sets("$avp(policer_auth_realm)", self.auth_realm)
                if KSR.uac.uac_auth() > 0:
                    KSR.tm.t_relay()
                return OK
            if self.gateways and KSR.tm.t_check_status("5[0-9][0-9]|408") > 0 \
                    and KSR.dispatcher.ds_next_dst() > 0:
                # the gateway failed: the next one with room (its egress leaves this one)
                r = self.gateway_with_room()
                if r.taken:
                    KSR.tm.t_on_failure("ksr_failure_upstream")
                    KSR.tm.t_relay()
                else:
                    self.reply_full(r, KSR.tm.t_reply)
        except Exception:
            self.on_exception("failure_route")
        return OK

    def ksr_reply_route(self, msg: object) -> int:
        return OK

    def ksr_onsend_route(self, msg: object) -> int:
        return OK

    def ksr_branch_route(self, msg: object) -> int:
        return OK

    def ksr_onreply_route(self, msg: object) -> int:
        return OK

    # ------------------------------------------------------------------ timer

    def ksr_policer_timer(self, msg: object, evname: str = "") -> int:
        """rtimer, every 100 ms: queued dialog events in batches; once a second the
        engine's tick (lease, lost nodes, library, refused operations, policy file)."""
        return policer_kamailio.timer()

    # ------------------------------------------------------------------ dialog

    def ksr_dialog_event(self, msg: object, event: str = "") -> int:
        return policer_kamailio.dialog_event(event)

    # ------------------------------------------------------------------ helpers

    def on_exception(self, where: str) -> None:
        try:
            call_id = KSR.pv.get("$ci")
        except Exception:
            call_id = None
        detail = " | ".join(traceback.format_exc().strip().splitlines()[-3:])
        policer_kamailio.log(
            "err", f"policer kemi: {where} failed for Call-ID {call_id!r}: {detail}"
        )


def mod_init() -> PolicerKemi:
    # Once per Kamailio start, before the workers fork: end this node's dialogs left
    # from an earlier run and take its lease (never raises).
    policer_kamailio.start()
    return PolicerKemi()
