"""The plan file loader: what a plan file becomes, and where each mistake in it is reported."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from clonebox_core.errors import InvalidArgument
from clonebox_core.model import AuthMethod
from clonebox_core.plan import (
    PLAN_CYCLE,
    PLAN_INVALID,
    PLAN_NO_HEALTH_CHECK,
    PLAN_UNKNOWN_DEPENDENCY,
    PLAN_UNKNOWN_VOLUME,
    PLAN_VOLUME_NOT_SHARED,
    Condition,
    Dependency,
    FailurePolicy,
    PlanVolume,
    UpdatePolicy,
    levels,
)
from clonebox_core.planfile import PLAN_FILE, TEMPLATE_PATH_ENV, load_plan_file, load_plan_text

pytestmark = pytest.mark.unit

SOURCE = "stack.yaml"
BOOT = "kernel_boot: {kernel: testguest/vmlinux}"
SECRET = "s3cr3t-TOKEN-42"

EXAMPLE = """\
version: 1
name: shop
defaults:
  vcpus: 1
  memory: 128MiB
  kernel_boot: {kernel: testguest/vmlinux}
  labels: {team: core}
vms:
  db:
    memory: 512MiB
    health_checks: [{name: port, type: tcp, tcp: {port: 5432}}]
    labels: {tier: data}
  migrate:
    depends_on: [db]
  api:
    vcpus: 2
    depends_on:
      db: {condition: healthy}
      migrate: {condition: completed}
    placement: {host: h1}
  web:
    depends_on: {api: }
update: {max_parallel: 2, min_healthy_time: 10s, healthy_deadline: 2m, auto_revert: true}
on_failure: leave
"""


@pytest.fixture
def stack(tmp_path: Path) -> Path:
    folder = tmp_path / "stack"
    folder.mkdir()
    return folder


def line_of(text: str, marker: str, nth: int = 1) -> str:
    """The 1-based line (as metadata holds it) of the nth line containing ``marker``."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if marker in line]
    return str(hits[nth - 1])


def refused(text: str, base: Path, reason: str = PLAN_INVALID, source: str = SOURCE) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        load_plan_text(text, source, base)
    err = info.value
    assert err.reason == reason, err.message
    assert "\n" not in err.message
    assert err.message.startswith(f"{err.metadata['file']}:{err.metadata['line']}: "), err.message
    return err


def doc(body: str) -> str:
    """A plan document: version, name, and ``body`` (indented YAML)."""
    return "version: 1\nname: stack\n" + textwrap.dedent(body)


# ------------------------------------------------------------------------------------- what it reads


def test_the_example_plan(stack: Path) -> None:
    plan = load_plan_text(EXAMPLE, SOURCE, stack)
    assert plan.name == "shop" and plan.source == SOURCE
    assert [v.service for v in plan.vms] == ["db", "migrate", "api", "web"]
    assert levels(plan) == [["db"], ["migrate"], ["api"], ["web"]]
    db, migrate, api, web = plan.vms
    assert db.spec.name == "shop-db" and db.spec.memory_mib == 512 and db.spec.vcpus == 1
    assert db.spec.label_dict() == {
        "clonebox.plan": "shop",
        "clonebox.service": "db",
        "team": "core",  # defaults' labels merged with the VM's
        "tier": "data",
    }
    assert migrate.spec.memory_mib == 128 and migrate.depends_on == (Dependency("db"),)
    assert api.spec.vcpus == 2 and api.host == "h1"
    assert api.depends_on == (Dependency("db", Condition.HEALTHY), Dependency("migrate", Condition.COMPLETED))
    assert web.depends_on == (Dependency("api", Condition.STARTED),)
    assert web.spec.auth is not None and web.spec.auth.method is AuthMethod.SSH_KEY  # inline VMs are version 2
    assert plan.update == UpdatePolicy(2, 10_000, 120_000, True)
    assert plan.on_failure is FailurePolicy.LEAVE


def test_defaults_merge_deeply_lists_are_replaced_and_the_vm_wins(stack: Path) -> None:
    plan = load_plan_text(
        doc(f"""\
        defaults:
          {BOOT}
          network: {{mode: libvirt, libvirt_network: lan}}
          provision: {{packages: [curl], services: [ssh]}}
          disks: [{{name: a, size: 1GiB}}]
        vms:
          one:
            provision: {{packages: [git]}}
          two:
            network: {{libvirt_network: wan}}
            disks: [{{name: b, size: 2GiB}}]
        """),
        SOURCE,
        stack,
    )
    one, two = (v.spec for v in plan.vms)
    assert one.provision is not None and one.provision.packages == ("git",) and one.provision.services == ("ssh",)
    assert one.network.libvirt_network == "lan" and [d.name for d in one.disks] == ["a"]
    assert two.network.libvirt_network == "wan" and [d.name for d in two.disks] == ["b"]


def test_a_merged_value_that_came_from_defaults_is_blamed_there(stack: Path) -> None:
    # mode: none merged over the defaults' libvirt_network: the leftover is the defaults' line
    body = doc(f"""\
        defaults:
          {BOOT}
          network: {{mode: libvirt, libvirt_network: lan}}
        vms:
          db:
            network: {{mode: none}}
        """)
    err = refused(body, stack)
    assert err.metadata["field"] == "defaults.network.libvirt_network"
    assert err.metadata["line"] == line_of(body, "libvirt_network: lan")


def test_the_defaults_for_the_plan_are_the_defaults_of_a_plan(stack: Path) -> None:
    plan = load_plan_text(f"version: 1\nvms:\n  db: {{{BOOT}}}\n", SOURCE, stack)
    assert plan.name == "stack"  # the folder's name
    assert plan.update == UpdatePolicy() and plan.on_failure is FailurePolicy.ROLLBACK
    assert plan.vms[0].depends_on == () and plan.vms[0].host == ""


def test_config_file_is_used_as_it_is(stack: Path) -> None:
    (stack / "db.yaml").write_text(
        "version: 1\nname: anything\nvcpus: 3\nmemory: 64MiB\nkernel_boot: {kernel: k}\nlabels: {app: pg}\n"
    )
    plan = load_plan_text(doc("defaults: {memory: 1GiB, vcpus: 1}\nvms:\n  db: {config: db.yaml}\n"), SOURCE, stack)
    spec = plan.vms[0].spec
    assert spec.name == "stack-db" and spec.vcpus == 3 and spec.memory_mib == 64  # no defaults merged
    assert spec.auth is None  # version 1 stays version 1
    assert spec.label_dict() == {"app": "pg", "clonebox.plan": "stack", "clonebox.service": "db"}


def test_template_is_found_on_the_template_path_with_defaults_under_and_inline_over(
    stack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "t1", tmp_path / "t2"
    first.mkdir()
    second.mkdir()
    (second / "small.yaml").write_text(f"version: 2\nvcpus: 2\n{BOOT}\nprovision: {{packages: [nginx]}}\n")
    monkeypatch.setenv(TEMPLATE_PATH_ENV, f"{first}::{second}")
    plan = load_plan_text(
        doc("""\
        defaults: {memory: 256MiB, vcpus: 1, labels: {team: web}}
        vms:
          web: {template: small, vcpus: 4}
          edge: {template: small}
        """),
        SOURCE,
        stack,
    )
    web, edge = (v.spec for v in plan.vms)
    assert (web.vcpus, web.memory_mib) == (4, 256)
    assert (edge.vcpus, edge.memory_mib) == (2, 256)  # the template beats defaults
    assert edge.provision is not None and edge.provision.packages == ("nginx",)
    assert edge.label_dict()["team"] == "web"


def test_environment_becomes_an_etc_environment_entry(stack: Path) -> None:
    plan = load_plan_text(
        doc(f"""\
        vms:
          api:
            {BOOT}
            cloud_init: {{user_data: {{runcmd: [echo hi]}}}}
            environment: {{DB_HOST: stack-db, QUOTED: 'say "hi" $HOME \\ `x`', _N2: ""}}
        """),
        SOURCE,
        stack,
    )
    spec = plan.vms[0].spec
    assert spec.cloud_init is not None
    text = spec.cloud_init.user_data.reveal()
    assert text.startswith("#cloud-config\n")
    cfg = yaml.safe_load(text)
    assert cfg["runcmd"] == ["echo hi"]  # the VM's own user-data is kept
    (entry,) = cfg["write_files"]
    assert entry["path"] == "/etc/environment" and entry["permissions"] == "0644" and entry["append"] is True
    assert entry["content"] == 'DB_HOST="stack-db"\nQUOTED="say \\"hi\\" \\$HOME \\\\ \\`x\\`"\n_N2=""\n'


def test_environment_on_a_v1_config_without_user_data(stack: Path) -> None:
    (stack / "db.yaml").write_text("version: 1\nname: db\nkernel_boot: {kernel: k}\n")
    plan = load_plan_text(doc("vms:\n  db: {config: db.yaml, environment: {A: b}}\n"), SOURCE, stack)
    spec = plan.vms[0].spec
    assert spec.cloud_init is not None and spec.auth is None
    assert yaml.safe_load(spec.cloud_init.user_data.reveal())["write_files"][0]["content"] == 'A="b"\n'


def test_load_plan_file_takes_a_file_or_its_folder(stack: Path) -> None:
    (stack / PLAN_FILE).write_text(f"version: 1\nvms:\n  db: {{{BOOT}}}\n")
    by_folder = load_plan_file(stack)
    by_file = load_plan_file(str(stack / PLAN_FILE))
    assert by_folder.source == by_file.source == str(stack / PLAN_FILE)
    assert by_file.name == "stack" and by_file.vms == by_folder.vms


def test_load_plan_file_reads_config_relative_to_the_plan(
    stack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (stack / "vms").mkdir()
    (stack / "vms" / "db.yaml").write_text("version: 2\nname: db\nkernel_boot: {kernel: k}\n")
    (stack / PLAN_FILE).write_text("version: 1\nvms:\n  db: {config: vms/db.yaml}\n")
    monkeypatch.chdir(tmp_path)  # not the plan's folder
    assert load_plan_file(Path("stack") / PLAN_FILE).vms[0].spec.name == "stack-db"


# -------------------------------------------------------------------------------- the file's shape


def test_missing_plan_file(stack: Path) -> None:
    with pytest.raises(InvalidArgument) as info:
        load_plan_file(stack / "nope.yaml")
    assert info.value.reason == PLAN_INVALID
    assert info.value.metadata == {"file": str(stack / "nope.yaml")}
    assert "no such file" in info.value.message
    with pytest.raises(InvalidArgument, match="no such file"):
        load_plan_file(stack)  # a folder without clonebox-compose.yaml


def test_empty_and_non_mapping_documents(stack: Path) -> None:
    assert refused("", stack).metadata["line"] == "1"
    err = refused(f"- {SECRET}\n", stack)
    assert "got a list" in err.message and SECRET not in err.message


def test_version_is_required_and_must_be_1(stack: Path) -> None:
    err = refused(f"name: stack\nvms:\n  db: {{{BOOT}}}\n", stack)
    assert err.metadata["field"] == "version" and "add 'version: 1'" in err.message
    err = refused(f"name: stack\nversion: 2\nvms:\n  db: {{{BOOT}}}\n", stack)
    assert err.metadata == {"file": SOURCE, "line": "2", "field": "version"}
    assert "2 is not supported" in err.message


@pytest.mark.parametrize(
    ("body", "marker", "field", "hint"),
    [
        (f"vms: {{db: {{{BOOT}}}}}\nupdates: {{}}\n", "updates", "updates", "did you mean 'update'?"),
        (f"vms:\n  db:\n    {BOOT}\n    dependson: [x]\n", "dependson", "vms.db.dependson", "'depends_on'?"),
        (f"vms: {{db: {{{BOOT}}}}}\nupdate: {{max_paralel: 3}}\n", "update", "update.max_paralel", "'max_parallel'?"),
    ],
)
def test_unknown_field_gets_a_hint(stack: Path, body: str, marker: str, field: str, hint: str) -> None:
    err = refused(doc(body), stack)
    assert err.metadata["line"] == line_of(doc(body), marker) and err.metadata["field"] == field
    assert hint in err.message


def test_compose_style_services_key(stack: Path) -> None:
    body = f"version: 1\nname: stack\nservices:\n  db: {{{BOOT}}}\n"
    err = refused(body, stack)
    assert err.metadata["field"] == "services" and err.metadata["line"] == "3"
    assert err.message.endswith("a plan calls its services vms: rename services: to vms:")  # nothing more


def test_a_missing_vms_is_reported_with_the_typo_counted(stack: Path) -> None:
    err = refused(doc(f"vm:\n  db: {{{BOOT}}}\n"), stack)
    assert err.metadata["line"] == "1" and "vms: required but missing" in err.message
    assert err.message.endswith("(and 1 more problem)")


@pytest.mark.parametrize(
    ("body", "marker", "field", "text"),
    [
        ("defaults: {volumes: [data]}\nvms: {db: {" + BOOT + "}}\n", "defaults", "defaults.volumes", "belongs to"),
        ("vms:\n  db:\n    " + BOOT + "\n    name: db1\n", "name: db1", "vms.db.name", "names its VMs itself"),
        ("vms:\n  db:\n    " + BOOT + "\n    version: 2\n", "version: 2", "vms.db.version", "version 2 specs"),
        (
            "vms:\n  db:\n    " + BOOT + "\n    image: debian\n",
            "image",
            "vms.db.image",
            "known fields: config, template",
        ),
        ("defaults: {image: x}\nvms: {db: {" + BOOT + "}}\n", "defaults", "defaults.image", "VM spec fields: vcpus"),
        ("defaults: {depends_on: [x]}\nvms: {db: {" + BOOT + "}}\n", "defaults", "defaults.depends_on", "belongs to"),
        ("defaults: {name: x}\nvms: {db: {" + BOOT + "}}\n", "defaults", "defaults.name", "sets each VM's name"),
    ],
)
def test_refused_fields(stack: Path, body: str, marker: str, field: str, text: str) -> None:
    err = refused(doc(body), stack)
    assert err.metadata["field"] == field
    assert err.metadata["line"] == line_of(doc(body), marker)
    assert text in err.message


def test_every_service_is_on_the_plans_default_network_unless_it_says_otherwise(stack: Path) -> None:
    plan = load_plan_text(doc("vms:\n  db: {" + BOOT + "}\n  web: {" + BOOT + "}\n"), SOURCE, stack)
    assert [n.name for n in plan.networks] == ["default"] and plan.networks[0].subnet == ""
    assert [v.network for v in plan.vms] == ["default", "default"]


def test_declared_networks_subnets_and_opting_out(stack: Path) -> None:
    body = f"""\
networks:
  front: {{subnet: 10.50.1.0/24}}
  back:
vms:
  db: {{{BOOT}, networks: [back]}}
  web: {{{BOOT}, networks: [front]}}
  tool: {{{BOOT}, networks: []}}
  own: {{{BOOT}, network: {{mode: none}}}}
"""
    plan = load_plan_text(doc(body), SOURCE, stack)
    assert [(n.name, n.subnet) for n in plan.networks] == [("front", "10.50.1.0/24"), ("back", "")]
    assert {v.service: v.network for v in plan.vms} == {"db": "back", "web": "front", "tool": "", "own": ""}


@pytest.mark.parametrize(
    ("body", "marker", "field", "text", "reason"),
    [
        (
            "vms:\n  db: {" + BOOT + ", networks: [nope]}\n",
            "networks",
            "vms.db.networks",
            "network 'nope', which the plan does not declare",
            "PLAN_UNKNOWN_NETWORK",
        ),
        (
            "networks: {a: {}, b: {}}\nvms:\n  db: {" + BOOT + ", networks: [a, b]}\n",
            "networks: [a",
            "vms.db.networks",
            "one plan network for now",
            "PLAN_INVALID",
        ),
        (
            "networks:\n  front: {subnet: 10.50.1.0}\nvms:\n  db: {" + BOOT + ", networks: [front]}\n",
            "subnet",
            "networks.front.subnet",
            "/16 to /29",
            "PLAN_INVALID",
        ),
        (
            "networks:\n  a: {subnet: 10.50.0.0/16}\n  b: {subnet: 10.50.1.0/24}\nvms:\n  db: {" + BOOT + "}\n",
            "subnet: 10.50.1",
            "networks.b.subnet",
            "overlaps 10.50.0.0/16 of network a",
            "PLAN_INVALID",
        ),
        (
            "vms:\n  db: {" + BOOT + ", networks: [default], network: {mode: none}}\n",
            "network: {mode",
            "vms.db.spec.network",
            "needs a network interface",
            "PLAN_INVALID",
        ),
    ],
)
def test_network_problems_name_line_and_field(
    stack: Path, body: str, marker: str, field: str, text: str, reason: str
) -> None:
    err = refused(doc(body), stack, reason=reason)
    assert err.metadata["field"] == field
    assert err.metadata["line"] == line_of(doc(body), marker)
    assert text in err.message


def test_several_problems_are_counted_and_the_first_in_the_file_is_reported(stack: Path) -> None:
    text = doc(f"""\
        vms:
          db:
            {BOOT}
            image: x
          api:
            {BOOT}
            placement: {{hots: h1}}
        update: {{max_parallel: "4"}}
        """)
    err = refused(text, stack)
    assert err.metadata["line"] == line_of(text, "image")
    # placement: hots is unknown, host is missing, max_parallel is quoted
    assert err.message.endswith("(and 3 more problems)")


@pytest.mark.parametrize(
    ("update", "field", "text"),
    [
        ("{max_parallel: 0}", "update.max_parallel", "0 is out of range: use 1..64"),
        ("{max_parallel: '4'}", "update.max_parallel", "expected a whole number"),
        ("{healthy_deadline: 500ms}", "update.healthy_deadline", "500ms is out of range: use 1s .. 24h"),
        ("{healthy_deadline: soon}", "update.healthy_deadline", "'soon' is not a duration"),
        ("{min_healthy_time: 5m, healthy_deadline: 5m}", "update.min_healthy_time", "must be shorter"),
        ("{auto_revert: yes please}", "update.auto_revert", "expected true or false"),
    ],
)
def test_update_policy_errors(stack: Path, update: str, field: str, text: str) -> None:
    body = doc(f"vms:\n  db: {{{BOOT}}}\nupdate: {update}\n")
    err = refused(body, stack)
    assert err.metadata["field"] == field and err.metadata["line"] == line_of(body, "update:")
    assert text in err.message


def test_on_failure_must_be_rollback_or_leave(stack: Path) -> None:
    body = doc(f"vms:\n  db: {{{BOOT}}}\non_failure: retry\n")
    err = refused(body, stack)
    assert err.metadata["field"] == "on_failure" and err.metadata["line"] == line_of(body, "on_failure")
    assert "'rollback' or 'leave'" in err.message


# ------------------------------------------------------------------------------------------ names


def test_plan_name_must_be_a_dns_label(stack: Path) -> None:
    body = f"version: 1\nname: My_Stack\nvms:\n  db: {{{BOOT}}}\n"
    err = refused(body, stack)
    assert err.metadata == {"file": SOURCE, "line": "2", "field": "name"}
    assert "'My_Stack' is not a DNS label" in err.message


def test_without_name_the_folder_must_be_a_dns_label(tmp_path: Path) -> None:
    folder = tmp_path / "My Stack"
    folder.mkdir()
    err = refused(f"version: 1\nvms:\n  db: {{{BOOT}}}\n", folder)
    assert err.metadata["field"] == "name" and err.metadata["line"] == "1"
    assert "folder name 'My Stack' is not a DNS label: add 'name: ...'" in err.message


def test_service_name_must_be_a_dns_label(stack: Path) -> None:
    body = doc(f"vms:\n  db: {{{BOOT}}}\n  my_api: {{{BOOT}}}\n")
    err = refused(body, stack)
    assert err.metadata["field"] == "vms.my_api" and err.metadata["line"] == line_of(body, "my_api")


def test_too_long_vm_name_says_by_how_much(stack: Path) -> None:
    service = "s" * 58  # stack- + 58 = 64
    body = doc(f"vms:\n  db: {{{BOOT}}}\n  {service}: {{{BOOT}}}\n")
    err = refused(body, stack)
    assert err.metadata["field"] == f"vms.{service}" and err.metadata["line"] == line_of(body, service)
    assert "64 characters, 1 more than a DNS label allows (63)" in err.message


def test_a_service_defined_twice_is_a_duplicate_key(stack: Path) -> None:
    body = doc(f"vms:\n  db: {{{BOOT}}}\n  db: {{{BOOT}}}\n")
    err = refused(body, stack)
    assert err.metadata["line"] == "5" and "duplicate key 'db' (first at line 4)" in err.message


def test_no_vms(stack: Path) -> None:
    body = doc("vms: {}\n")
    err = refused(body, stack)
    assert err.metadata["field"] == "vms" and err.metadata["line"] == line_of(body, "vms")
    assert "at least one VM" in err.message
    assert "required but missing: add 'vms: ...'" in refused(doc("update: {}\n"), stack).message


@pytest.mark.parametrize("key", ["clonebox.plan", "clonebox.service"])
def test_plan_labels_are_reserved(stack: Path, key: str) -> None:
    body = doc(f"vms:\n  db:\n    {BOOT}\n    labels: {{app: x, {key}: y}}\n")
    err = refused(body, stack)
    assert err.metadata["field"] == f"vms.db.labels.{key}" and err.metadata["line"] == line_of(body, "labels")
    assert "set by the plan" in err.message
    body = doc(f"defaults:\n  labels:\n    {key}: y\nvms:\n  db: {{{BOOT}}}\n")
    err = refused(body, stack)
    assert err.metadata["field"] == f"defaults.labels.{key}" and err.metadata["line"] == line_of(body, key)


# ---------------------------------------------------------------------------------- dependencies


def test_unknown_dependency_points_at_the_entry(stack: Path) -> None:
    body = doc(f"vms:\n  db: {{{BOOT}}}\n  api:\n    {BOOT}\n    depends_on:\n      - db\n      - cache\n")
    err = refused(body, stack, PLAN_UNKNOWN_DEPENDENCY)
    assert err.metadata["line"] == line_of(body, "- cache")
    assert err.metadata["field"] == "vms.api.depends_on[1]"
    assert "api depends on 'cache', which is not a service of this plan (services: db, api)" in err.message


def test_unknown_dependency_in_mapping_form(stack: Path) -> None:
    body = doc(f"vms:\n  api:\n    {BOOT}\n    depends_on:\n      dbb: {{condition: healthy}}\n  db: {{{BOOT}}}\n")
    err = refused(body, stack, PLAN_UNKNOWN_DEPENDENCY)
    assert err.metadata["line"] == line_of(body, "dbb") and err.metadata["field"] == "vms.api.depends_on.dbb"


def test_cycle_is_reported_as_a_path(stack: Path) -> None:
    body = doc(f"""\
        vms:
          db: {{{BOOT}}}
          api:
            {BOOT}
            depends_on: [db, web]
          web:
            {BOOT}
            depends_on: [api]
        """)
    err = refused(body, stack, PLAN_CYCLE)
    assert "dependency cycle: api -> web -> api" in err.message
    assert err.metadata["field"] == "vms.api.depends_on"
    assert err.metadata["line"] == line_of(body, "depends_on: [db, web]")


def test_self_dependency(stack: Path) -> None:
    body = doc(f"vms:\n  db:\n    {BOOT}\n    depends_on: [db]\n")
    err = refused(body, stack, PLAN_CYCLE)
    assert "dependency cycle: db -> db" in err.message and err.metadata["line"] == line_of(body, "depends_on")


def test_dependency_listed_twice(stack: Path) -> None:
    body = doc(f"vms:\n  db: {{{BOOT}}}\n  api:\n    {BOOT}\n    depends_on:\n      - db\n      - db\n")
    err = refused(body, stack)
    assert err.metadata["line"] == line_of(body, "- db", 2) and "'db' is listed twice" in err.message


@pytest.mark.parametrize(
    ("depends_on", "text"),
    [
        ("db", "expected a list of services ([db, cache]) or a mapping"),
        ("[1]", "expected a service name, got 1"),
        ("{db: healthy}", "expected a mapping like {condition: healthy}, got 'healthy'"),
        ("{db: {condition: service_healthy}}", "'service_healthy' is not allowed: use 'started', 'healthy' or"),
        ("{db: {conditon: healthy}}", "did you mean 'condition'"),
    ],
)
def test_depends_on_shapes(stack: Path, depends_on: str, text: str) -> None:
    body = doc(f"vms:\n  db: {{{BOOT}}}\n  api:\n    {BOOT}\n    depends_on: {depends_on}\n")
    err = refused(body, stack)
    assert err.metadata["line"] == line_of(body, "depends_on") and err.metadata["field"].startswith(
        "vms.api.depends_on"
    )
    assert text in err.message


def test_waiting_for_health_needs_health_checks(stack: Path) -> None:
    body = doc(f"""\
        vms:
          db: {{{BOOT}}}
          api:
            {BOOT}
            depends_on:
              db:
                condition: healthy
        """)
    err = refused(body, stack, PLAN_NO_HEALTH_CHECK)
    assert err.metadata["line"] == line_of(body, "condition: healthy")
    assert err.metadata["field"] == "vms.api.depends_on.db.condition"
    assert err.message.endswith(
        "api waits for db to be healthy, but db has no health_checks: add one, or use condition: started"
    )


def test_placement_host_must_be_a_dns_label(stack: Path) -> None:
    body = doc(f"vms:\n  db:\n    {BOOT}\n    placement: {{host: Big_Host}}\n")
    err = refused(body, stack)
    assert err.metadata["field"] == "vms.db.placement.host" and err.metadata["line"] == line_of(body, "placement")


# ------------------------------------------------------------------------------------ VM specs


def test_spec_error_inline_is_at_the_plan_line_with_the_vm_path(stack: Path) -> None:
    body = doc(f"vms:\n  db: {{{BOOT}}}\n  api:\n    {BOOT}\n    memory: 0MiB\n")
    err = refused(body, stack)
    assert err.metadata == {"file": SOURCE, "line": line_of(body, "memory"), "field": "vms.api.memory"}
    assert "vms.api.memory: '0MiB' must be at least 16 MiB" in err.message


def test_spec_error_from_validate_spec_is_located_too(stack: Path) -> None:
    body = doc("vms:\n  db:\n    disks:\n      - {name: Data, size: 1GiB}\n")
    err = refused(body, stack)
    assert err.metadata["field"] == "vms.db.disks[0].name" and err.metadata["line"] == line_of(body, "Data")


def test_spec_error_in_defaults_is_at_the_defaults_line(stack: Path) -> None:
    body = doc(f"defaults:\n  vcpus: many\nvms:\n  db: {{{BOOT}}}\n")
    err = refused(body, stack)
    assert err.metadata["field"] == "defaults.vcpus" and err.metadata["line"] == line_of(body, "vcpus")


def test_nothing_to_boot_blames_the_service(stack: Path) -> None:
    body = doc("vms:\n  db:\n    vcpus: 1\n")
    err = refused(body, stack)
    assert err.metadata["field"] == "vms.db.disks" and err.metadata["line"] == line_of(body, "vcpus")
    assert "nothing to boot" in err.message


def test_cloud_init_values_are_never_quoted(stack: Path) -> None:
    body = doc(f"vms:\n  db:\n    {BOOT}\n    cloud_init: {{user_data: {{password: {SECRET}}}}}\n")
    err = refused(body, stack)
    assert SECRET not in err.message and err.metadata["field"].startswith("vms.db.cloud_init.user_data")
    # also when the YAML reader refuses it, before any service is known
    body = doc(f"vms:\n  db:\n    cloud_init:\n      user_data: {{{SECRET}: 1, {SECRET}: 2}}\n")
    err = refused(body, stack)
    assert "duplicate key" in err.message and SECRET not in err.message


def test_environment_values_are_never_quoted(stack: Path) -> None:
    body = doc(f"vms:\n  db:\n    {BOOT}\n    environment: {{PW: 42, A: b}}\n")
    err = refused(body, stack)
    assert err.metadata["field"] == "vms.db.environment.PW" and "expected a string, got a number" in err.message


def test_inline_fields_next_to_config_are_refused(stack: Path) -> None:
    (stack / "db.yaml").write_text("version: 1\nname: db\nkernel_boot: {kernel: k}\n")
    body = doc("vms:\n  db:\n    config: db.yaml\n    vcpus: 2\n")
    err = refused(body, stack)
    assert err.metadata["field"] == "vms.db.vcpus" and err.metadata["line"] == line_of(body, "vcpus")
    assert "not allowed next to config:" in err.message


def test_config_and_template_are_exclusive(stack: Path) -> None:
    body = doc("vms:\n  db:\n    config: db.yaml\n    template: small\n")
    err = refused(body, stack)
    assert err.metadata["field"] == "vms.db.template" and err.metadata["line"] == line_of(body, "template")


def test_missing_config_file_is_at_the_config_line(stack: Path) -> None:
    body = doc("vms:\n  db:\n    config: nope.yaml\n")
    err = refused(body, stack)
    assert err.metadata["field"] == "vms.db.config" and err.metadata["line"] == line_of(body, "config")
    assert "no such file" in err.message and str(stack / "nope.yaml") in err.message


def test_error_inside_config_file_is_at_that_file_line(stack: Path) -> None:
    (stack / "db.yaml").write_text("version: 2\nname: db\nkernel_boot: {kernel: k}\nvcpus: 0\n")
    err = refused(doc("vms:\n  db: {config: db.yaml}\n"), stack)
    assert err.metadata == {"file": str(stack / "db.yaml"), "line": "4", "field": "vcpus"}


def test_reserved_label_in_config_file(stack: Path) -> None:
    (stack / "db.yaml").write_text("version: 1\nname: db\nkernel_boot: {kernel: k}\nlabels:\n  clonebox.plan: x\n")
    err = refused(doc("vms:\n  db: {config: db.yaml}\n"), stack)
    assert err.metadata == {"file": str(stack / "db.yaml"), "line": "5", "field": "labels.clonebox.plan"}


def test_yaml_error_in_config_file_keeps_its_reason(stack: Path) -> None:
    (stack / "db.yaml").write_text("version: 1\nname: db\nname: again\n")
    err = refused(doc("vms:\n  db: {config: db.yaml}\n"), stack)
    assert err.metadata["file"] == str(stack / "db.yaml") and err.metadata["line"] == "3"
    assert "duplicate key" in err.message


def test_template_not_found_lists_where_it_looked(stack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEMPLATE_PATH_ENV, str(tmp_path / "a") + ":" + str(tmp_path / "b"))
    body = doc("vms:\n  db:\n    template: small\n")
    err = refused(body, stack)
    assert err.metadata["field"] == "vms.db.template" and err.metadata["line"] == line_of(body, "template")
    assert f"looked for small.yaml in {tmp_path / 'a'}, {tmp_path / 'b'}, " in err.message
    assert ".config/clonebox/templates" in err.message


def test_template_name_is_a_plain_name(stack: Path) -> None:
    err = refused(doc("vms:\n  db: {template: ../etc/small}\n"), stack)
    assert err.metadata["field"] == "vms.db.template" and "is not a template name" in err.message


def test_template_problems_are_at_the_template_line(
    stack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TEMPLATE_PATH_ENV, str(tmp_path))
    (tmp_path / "named.yaml").write_text(f"{BOOT}\nname: x\n")
    (tmp_path / "bad.yaml").write_text(f"{BOOT}\nmemory: 1MiB\n")
    err = refused(doc("vms:\n  db: {template: named}\n"), stack)
    assert err.metadata == {"file": str(tmp_path / "named.yaml"), "line": "2", "field": "name"}
    err = refused(doc("vms:\n  db: {template: bad}\n"), stack)
    assert err.metadata == {"file": str(tmp_path / "bad.yaml"), "line": "2", "field": "memory"}


@pytest.mark.parametrize(
    ("environment", "field", "text"),
    [
        ("{1A: x}", "vms.db.environment.1A", "is not a variable name"),
        ("{A-B: x}", "vms.db.environment.A-B", "is not a variable name"),
        ('{A: "one\\ntwo"}', "vms.db.environment.A", "line break or NUL"),
    ],
)
def test_environment_keys_and_values(stack: Path, environment: str, field: str, text: str) -> None:
    body = doc(f"vms:\n  db:\n    {BOOT}\n    environment: {environment}\n")
    err = refused(body, stack)
    assert err.metadata["field"] == field and err.metadata["line"] == line_of(body, "environment")
    assert text in err.message and "two" not in err.message


def test_environment_needs_cloud_config_user_data(stack: Path) -> None:
    (stack / "db.yaml").write_text(
        'version: 1\nname: db\nkernel_boot: {kernel: k}\ncloud_init: {user_data: "#!/bin/sh\\necho hi\\n"}\n'
    )
    body = doc("vms:\n  db:\n    config: db.yaml\n    environment: {A: b}\n")
    err = refused(body, stack)
    assert err.metadata["field"] == "vms.db.environment" and err.metadata["line"] == line_of(body, "environment")
    assert "not #cloud-config" in err.message


def test_environment_refuses_a_second_etc_environment(stack: Path) -> None:
    body = doc(f"""\
        vms:
          db:
            {BOOT}
            cloud_init: {{user_data: {{write_files: [{{path: /etc/environment, content: x}}]}}}}
            environment: {{A: b}}
        """)
    err = refused(body, stack)
    assert err.metadata["line"] == line_of(body, "environment: {A") and "writes /etc/environment itself" in err.message


def test_environment_keeps_user_data_within_the_cloud_init_limit(stack: Path) -> None:
    big = "x" * (1024 * 1024)
    body = doc(f"vms:\n  db:\n    {BOOT}\n    environment: {{BIG: {big}}}\n")
    err = refused(body, stack)
    assert err.metadata["field"] == "vms.db.environment" and "larger than 1 MiB" in err.message
    assert big[:100] not in err.message


def test_user_data_may_not_set_passwords_with_environment_either(stack: Path) -> None:
    body = doc(f"""\
        vms:
          db:
            {BOOT}
            cloud_init:
              user_data: {{chpasswd: {{list: "root:{SECRET}"}}}}
            environment: {{A: b}}
        """)
    err = refused(body, stack)
    assert err.metadata["field"] == "vms.db.cloud_init.user_data.chpasswd"
    assert err.metadata["line"] == line_of(body, "user_data") and SECRET not in err.message


# ------------------------------------------------------------------------------------------- volumes

VOLUMES = f"""\
defaults:
  {BOOT}
volumes:
  data: {{size: 1GiB}}
  shared-cache: {{size: 256MiB, shared: true}}
vms:
  db:
    volumes: [data]
  api:
    volumes: ["shared-cache"]
  web:
    volumes: ["shared-cache"]
"""


def test_volumes_are_read_with_their_users(stack: Path) -> None:
    plan = load_plan_text(doc(VOLUMES), SOURCE, stack)
    assert plan.volumes == (PlanVolume("data", 1024), PlanVolume("shared-cache", 256, shared=True))
    assert [(v.service, v.volumes) for v in plan.vms] == [
        ("db", ("data",)),
        ("api", ("shared-cache",)),
        ("web", ("shared-cache",)),
    ]
    # the disks are the controller's to add (attach_volumes), so the file's specs have none yet
    assert all(not d.volume for v in plan.vms for d in v.spec.disks)


def test_an_unknown_volume_is_refused_at_its_entry(stack: Path) -> None:
    text = doc(VOLUMES.replace('api:\n    volumes: ["shared-cache"]', 'api:\n    volumes: ["cache"]'))
    err = refused(text, stack, PLAN_UNKNOWN_VOLUME)
    assert err.metadata["field"] == "vms.api.volumes[0]"
    assert err.metadata["line"] == line_of(text, '["cache"]')
    assert "'cache'" in err.message and "volumes: data, shared-cache" in err.message


def test_a_single_writer_volume_used_twice_names_the_services_and_the_fix(stack: Path) -> None:
    text = doc(VOLUMES.replace('web:\n    volumes: ["shared-cache"]', 'web:\n    volumes: ["shared-cache", data]'))
    err = refused(text, stack, PLAN_VOLUME_NOT_SHARED)
    assert err.metadata["field"] == "vms.web.volumes[1]"
    assert err.metadata["line"] == line_of(text, '["shared-cache", data]')
    assert "used by db, web" in err.message and "shared: true" in err.message


@pytest.mark.parametrize(
    ("volumes", "marker", "field", "text"),
    [
        ("data: {size: 0}", "data:", "volumes.data.size", "at least 1 MiB"),
        ("data: {size: 1GB}", "data:", "volumes.data.size", "ambiguous"),
        ("data: {}", "data:", "volumes.data.size", "missing"),
        ("data:", "data:", "volumes.data", "needs a size"),
        ("data: {size: 1GiB, shared: yes-please}", "data:", "volumes.data.shared", "expected true or false"),
        ("data: {size: 1GiB, mode: rw}", "data:", "volumes.data.mode", "unknown field"),
        ("Data_1: {size: 1GiB}", "Data_1", "volumes.Data_1", "DNS label"),
        ("d" + "x" * 60 + ": {size: 1GiB}", "dxx", "volumes.d" + "x" * 60, "shorten the volume name"),
    ],
)
def test_bad_volumes_are_refused_where_written(stack: Path, volumes: str, marker: str, field: str, text: str) -> None:
    body = f"volumes:\n  {volumes}\nvms:\n  db: {{{BOOT}}}\n"
    err = refused(doc(body), stack)
    assert err.metadata["field"] == field, err.message
    assert err.metadata["line"] == line_of(doc(body), marker)
    assert text in err.message


@pytest.mark.parametrize(
    ("entry", "text"),
    [
        ('["data:var/lib/db"]', "must be an absolute guest path"),
        ('["data:/"]', "must be an absolute guest path"),
        ('["data:/var/lib db"]', "must be an absolute guest path"),
        ('["data:/mnt/a/../b"]', "must be an absolute guest path"),
        ('["cache:/mnt/cache"]', "a mount formats it with ext4"),
        ('["data:/mnt", "other:/mnt"]', "already the mount path"),
        ("[data, data]", "listed more than once"),
        ("data", "expected a list"),
    ],
)
def test_bad_volume_entries_of_a_service(stack: Path, entry: str, text: str) -> None:
    body = (
        "volumes:\n  data: {size: 1GiB}\n  other: {size: 1GiB}\n  cache: {size: 1GiB, shared: true}\n"
        f"vms:\n  db:\n    {BOOT}\n    volumes: {entry}\n"
    )
    err = refused(doc(body), stack)
    assert err.metadata["field"].startswith("vms.db.volumes"), err.message
    assert err.metadata["line"] == line_of(doc(body), "volumes: " + entry[:3])
    assert text.lower() in err.message.lower()


def test_a_disk_named_like_a_volume_disk_is_refused(stack: Path) -> None:
    body = (
        "volumes:\n  data: {size: 1GiB}\nvms:\n  db:\n    disks: [{name: vol-data, size: 1GiB}]\n    volumes: [data]\n"
    )
    err = refused(doc(body), stack)
    assert err.metadata["field"] == "vms.db.volumes[0]"
    assert "'vol-data'" in err.message and "rename that disk" in err.message


def test_a_mount_path_formats_the_blank_volume_and_mounts_it(stack: Path, tmp_path: Path) -> None:
    from tests.unit.core.test_cloudinit_render import assert_valid_cloud_config

    body = (
        "volumes:\n  data: {size: 1GiB}\n  logs: {size: 1GiB}\n"
        "vms:\n  db:\n    " + BOOT + "\n    cloud_init: {user_data: {mounts: [[tmpfs, /scratch, tmpfs]]}}\n"
        '    volumes: ["data:/var/lib/db", logs]\n'
    )
    plan = load_plan_text(doc(body), SOURCE, stack)
    db = plan.vm("db")
    assert db.volumes == ("data", "logs")  # the names; the mount is in the user-data
    assert db.spec.cloud_init is not None
    text = db.spec.cloud_init.user_data.reveal()
    cfg = yaml.safe_load(text)
    device = "/dev/disk/by-id/virtio-vol-stack-data"
    assert cfg["fs_setup"] == [{"device": device, "filesystem": "ext4", "partition": "none", "overwrite": False}]
    assert cfg["mounts"] == [
        ["tmpfs", "/scratch", "tmpfs"],  # the VM's own entry is kept, the volume's appended
        [device, "/var/lib/db", "ext4", "defaults,nofail,x-systemd.device-timeout=30s", "0", "2"],
    ]
    assert_valid_cloud_config(text, tmp_path)


def test_two_volumes_the_guest_cannot_tell_apart_cannot_both_be_mounted(stack: Path) -> None:
    body = (
        "volumes:\n  databases-one: {size: 1GiB}\n  databases-two: {size: 1GiB}\n"
        "vms:\n  db:\n    " + BOOT + '\n    volumes: ["databases-one:/a", "databases-two:/b"]\n'
    )
    err = refused(doc(body), stack)
    assert err.metadata["field"] == "vms.db.volumes[1]"
    assert "/dev/disk/by-id/virtio-vol-stack-databases" in err.message and "rename one" in err.message
