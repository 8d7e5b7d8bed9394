"""The gateway side of a shape change: the router's replica set replaced, old replicas retired when idle."""

from __future__ import annotations

import asyncio

import pytest

from scalellm.gateway.app import GatewayApp
from scalellm.gateway.config import GatewayConfig
from scalellm.gateway.control import ReplicaSetFollower, ReplicaSetUpdate
from scalellm.gateway.policies import RouteRequest
from scalellm.gateway.router import NoReplicaAvailable
from scalellm.shape.shape import Shape
from tests.integration.gateway_fakes import FakeReplica


class ClosingReplica(FakeReplica):
    """A fake replica that remembers being closed."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def gateway(*addresses: str) -> tuple[GatewayApp, ReplicaSetFollower]:
    app = GatewayApp(GatewayConfig(replica_addresses=addresses, routing_policy="round_robin"),
                     clients=[ClosingReplica(a) for a in addresses])
    return app, ReplicaSetFollower(app, make_client=ClosingReplica)


def shape_lines(app: GatewayApp) -> list[str]:
    return sorted(line for line in app.metrics.render().decode().splitlines()
                  if line.startswith(("scalellm:shape_info", "scalellm:shape_changes_total")))


def test_new_requests_go_to_the_new_set_while_old_ones_finish_then_the_old_clients_close():
    async def scenario():
        app, follower = gateway("old:1")
        follower.apply(ReplicaSetUpdate(("old:1",), Shape(1, 2)))
        old = app.router.replicas[0]
        in_flight = app.router.dispatch(RouteRequest("", 10))
        follower.apply(ReplicaSetUpdate(("new:1", "new:2"), Shape(2, 1), "load 40"))
        assert [s.address for s in app.router.replicas] == ["new:1", "new:2"]
        assert {app.router.dispatch(RouteRequest("", 1)).replica.address for _ in range(4)} == {"new:1", "new:2"}
        await asyncio.sleep(0.2)
        assert not old.client.closed  # its request still runs there
        in_flight.finish(True)
        await asyncio.wait_for(follower.wait_closed(), 2)
        assert old.client.closed and old.num_requests_in_flight == 0
        return app

    app = asyncio.run(scenario())
    assert shape_lines(app) == ['scalellm:shape_changes_total 1.0', 'scalellm:shape_info{parallel="1",replicas="2"} 1.0',
                                'scalellm:shape_info{parallel="2",replicas="1"} 0.0']
    assert 'replica="old:1"' not in app.metrics.render().decode()  # retired replicas leave no stale series


def test_an_unchanged_update_keeps_states_and_counts_no_change():
    async def scenario():
        app, follower = gateway("a:1", "a:2")
        follower.apply(ReplicaSetUpdate(("a:1", "a:2"), Shape(2, 1)))
        states = list(app.router.replicas)
        follower.apply(ReplicaSetUpdate(("a:1", "a:2"), Shape(2, 1)))
        follower.apply(ReplicaSetUpdate(("a:2", "b:1"), Shape(2, 1)))  # same shape, one replica replaced
        assert app.router.replicas[0] is states[1] and app.router.replicas[1].address == "b:1"
        await follower.wait_closed()
        assert states[0].client.closed and not states[1].client.closed
        return app

    assert 'scalellm:shape_changes_total 0.0' in shape_lines(asyncio.run(scenario()))


def test_indices_are_never_reused_so_tried_replicas_stay_excluded():
    app, _ = gateway("a:1")
    first = app.router.replicas[0]
    app.router.replace_replicas(["b:1"], ClosingReplica)
    app.router.replace_replicas(["a:1"], ClosingReplica)  # the same address again: a new state
    assert app.router.replicas[0].index not in {first.index, 1}
    with pytest.raises(NoReplicaAvailable):
        app.router.dispatch(RouteRequest(), exclude=frozenset({app.router.replicas[0].index}))
    with pytest.raises(ValueError):
        app.router.replace_replicas([], ClosingReplica)


def test_follow_applies_lines_until_end_of_input_and_skips_malformed_ones():
    async def scenario():
        app, follower = gateway("a:1")
        reader = asyncio.StreamReader()
        reader.feed_data(ReplicaSetUpdate(("a:1",), Shape(1, 2)).encode())
        reader.feed_data(b"not json\n" + b'{"shape": "2x1"}\n')
        reader.feed_data(ReplicaSetUpdate(("b:1", "b:2"), Shape(2, 1)).encode())
        reader.feed_eof()
        await asyncio.wait_for(follower.follow(reader), 2)
        return app

    app = asyncio.run(scenario())
    assert [s.address for s in app.router.replicas] == ["b:1", "b:2"]
    assert 'scalellm:shape_changes_total 1.0' in shape_lines(app)


def test_update_lines_round_trip_and_bad_ones_are_refused():
    update = ReplicaSetUpdate(("127.0.0.1:5001", "127.0.0.1:5002"), Shape(2, 1), "why")
    line = update.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert ReplicaSetUpdate.decode(line) == update
    for bad in (b"[]", b'{"replicas": ["a:1"], "shape": "2"}', b'{"replicas": [], "shape": "1x1"}',
                b'{"replicas": ["nohost"], "shape": "1x1"}', b"{"):
        with pytest.raises(ValueError):
            ReplicaSetUpdate.decode(bad)
