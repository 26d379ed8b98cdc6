"""The incremental placement (`Placer.advance`) against the full one (`place`), change by
change: the deliveries must be the same, in the same order."""

from __future__ import annotations

import random
from typing import Any

from tests.store.conftest import config_map, node, pod, secret
from tests.store.test_manifests_and_routing import stored
from trio_cloudhub.store.manifests import ObjectKey
from trio_cloudhub.store.routing import Delivery, Placer, StoredObject, place, plan

Objects = dict[ObjectKey, StoredObject]
NODES = [f"n{i}" for i in range(4)]
CONFIG_MAPS = [f"c{i}" for i in range(4)]
SECRETS = [f"s{i}" for i in range(3)]


def shape(deliveries: list[Delivery]) -> list[tuple[str, str, str, int]]:
    return [(d.node, d.operation, d.obj.uid, d.obj.rv) for d in deliveries]


class World:
    """Random objects; every version of a key keeps its uid, a re-created key gets a new one."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.serial = 0
        self.rv = 0

    def doc(self) -> dict[str, Any]:
        pick = self.random
        kind = pick.choice(["Node", "Pod", "Pod", "Pod", "ConfigMap", "Secret"])
        if kind == "Node":
            return node(pick.choice(NODES))
        if kind == "ConfigMap":
            return config_map(pick.choice(CONFIG_MAPS), {"v": str(pick.random())})
        if kind == "Secret":
            return secret(pick.choice(SECRETS), {"v": str(pick.random())})
        uses = pick.sample(CONFIG_MAPS, pick.randint(0, 2))
        needs = pick.sample(SECRETS, pick.randint(0, 1))
        return pod(
            f"p{pick.randint(0, 7)}",
            pick.choice([*NODES, ""]),
            volumes=[{"name": name, "configMap": {"name": name}} for name in uses],
            image_pull_secrets=needs,
        )

    def version(self, doc: dict[str, Any], old: StoredObject | None) -> StoredObject:
        self.rv += 1
        self.serial += 1
        uid = old.uid if old is not None else f"uid-{self.serial}"
        return stored(doc, uid, self.rv)


def test_incremental_placement_plans_like_the_full_one() -> None:
    for seed in range(40):
        world = World(seed)
        objects: Objects = {}
        placer = Placer()
        for _ in range(30):
            new = dict(objects)
            removed: dict[str, StoredObject] = {}
            for _ in range(world.random.randint(1, 4)):  # one version per key and change
                if new and world.random.random() < 0.3:
                    key = world.random.choice(sorted(new, key=str))
                    if new.get(key) is objects.get(key):
                        world.rv += 1
                        gone = new.pop(key)
                        removed[gone.uid] = stored(gone.body, gone.uid, world.rv)
                else:
                    doc = world.doc()
                    key = stored(doc, "probe").key
                    if key in objects and key not in new:
                        continue  # removed in this change
                    new[key] = world.version(doc, objects.get(key))
            dirty = {
                key for key in objects.keys() | new.keys() if new.get(key) is not objects.get(key)
            }
            changed = {new[key].uid for key in dirty if key in new and key in objects}
            by_uid = {obj.uid: obj for obj in objects.values()}
            by_uid.update((obj.uid, obj) for obj in new.values())
            by_uid.update(removed)
            expected = plan(place(objects), place(new), by_uid, changed)
            step = placer.advance(objects, new, dirty)
            assert shape(plan(step.old, step.new, by_uid, changed)) == shape(expected), seed
            assert step.new <= place(new) and step.old <= place(objects)
            assert placer.pairs(new, new) == place(new)  # the index describes `new`
            objects = new


def test_one_config_map_change_touches_only_its_pairs() -> None:
    cfg = stored(config_map("cfg"), "cfg")
    pods = [
        stored(pod(f"p{i}", f"n{i}", env_from=[{"configMapRef": {"name": "cfg"}}]), f"p{i}")
        for i in range(50)
    ]
    objects = {obj.key: obj for obj in [cfg, *pods, stored(node("n0"), "node")]}
    placer = Placer.of(objects)
    edited = stored(config_map("cfg", {"k": "v"}), "cfg", rv=2)
    new = objects | {edited.key: edited}
    step = placer.advance(objects, new, {edited.key})
    assert step.keys == {edited.key}
    assert step.old == step.new == {(f"n{i}", "cfg") for i in range(50)}
    deliveries = plan(step.old, step.new, {"cfg": edited}, {"cfg"})
    assert {(d.operation, d.obj.rv) for d in deliveries} == {("update", 2)}
    assert len(deliveries) == 50


def test_node_coming_back_gets_everything_placed_on_it() -> None:
    cfg = stored(config_map("cfg"), "cfg")
    web = stored(pod("web", "n1", volumes=[{"name": "v", "configMap": {"name": "cfg"}}]), "web")
    other = stored(pod("other", "n2", volumes=[{"name": "v", "configMap": {"name": "cfg"}}]), "o")
    objects = {obj.key: obj for obj in [cfg, web, other]}
    placer = Placer.of(objects)
    back = stored(node("n1"), "node-1")
    new = objects | {back.key: back}
    step = placer.advance(objects, new, {back.key})
    by_uid = {obj.uid: obj for obj in new.values()}
    assert [(d.node, d.operation, d.obj.uid) for d in plan(step.old, step.new, by_uid)] == [
        ("n1", "insert", "node-1"),
        ("n1", "insert", "cfg"),
        ("n1", "insert", "web"),
    ]
