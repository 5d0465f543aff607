"""Transport-free domain models shared by the agent, the controller and the CLI.

These are plain frozen dataclasses; protobuf conversion lives in ``clonebox_core.rpc.convert`` and the
YAML spec file in ``clonebox_core.spec``. Sizes are MiB throughout.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from clonebox_core.health import Probe
from clonebox_core.secret import Secret


class VmState(enum.Enum):
    """Lifecycle state of a VM (mirrors ``clonebox.type.v1.VmState``)."""

    UNSPECIFIED = 0
    PENDING = 1
    CREATING = 2
    RUNNING = 3
    PAUSED = 4
    STOPPING = 5
    STOPPED = 6
    CRASHED = 7
    DELETING = 8
    FAILED = 9


class NetworkMode(enum.Enum):
    """How a VM is attached to the network."""

    LIBVIRT = 1
    NONE = 2
    #: a network the agent makes for a group of VMs (a plan) and removes with its last VM
    MANAGED = 3


class HostState(enum.Enum):
    """Controller's view of a host (mirrors ``clonebox.type.v1.HostState``)."""

    UNSPECIFIED = 0
    READY = 1
    UNREACHABLE = 2
    NOT_SERVING = 3


@dataclass(frozen=True)
class Resources:
    """An amount of CPU, memory and disk."""

    vcpus: int = 0
    memory_mib: int = 0
    disk_mib: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.vcpus + other.vcpus,
            self.memory_mib + other.memory_mib,
            self.disk_mib + other.disk_mib,
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            self.vcpus - other.vcpus,
            self.memory_mib - other.memory_mib,
            self.disk_mib - other.disk_mib,
        )

    def fits_in(self, room: Resources) -> bool:
        """True when every dimension is at most the same dimension of ``room``."""
        return self.vcpus <= room.vcpus and self.memory_mib <= room.memory_mib and self.disk_mib <= room.disk_mib


@dataclass(frozen=True)
class DiskSpec:
    """A qcow2 overlay on ``base_image``, a blank qcow2 of ``size_mib``, or the agent volume ``volume``.

    A volume disk (``volume`` set) attaches a volume made by the agent's ``CreateVolume`` instead of
    making a disk: ``base_image`` and ``size_mib`` stay empty, and deleting the VM keeps the volume.
    """

    name: str
    base_image: str = ""
    size_mib: int = 0
    volume: str = ""


@dataclass(frozen=True)
class Volume:
    """A disk on one agent's host that outlives the VMs attaching it (``DiskSpec.volume``).

    ``shared``: several VM definitions may attach it at once (a raw file, no host cache, ``<shareable/>``);
    otherwise one at a time (a qcow2 file). ``vms``: the VMs whose definitions attach it, sorted.
    """

    name: str
    size_mib: int
    shared: bool = False
    labels: tuple[tuple[str, str], ...] = ()
    vms: tuple[str, ...] = ()
    create_time: datetime | None = None

    def label_dict(self) -> dict[str, str]:
        """Labels as a dict."""
        return dict(self.labels)


@dataclass(frozen=True)
class KernelBoot:
    """Direct kernel boot inputs."""

    kernel: str
    initrd: str = ""
    cmdline: str = ""


@dataclass(frozen=True)
class NetworkSpec:
    """Network attachment."""

    mode: NetworkMode = NetworkMode.LIBVIRT
    libvirt_network: str = "default"
    #: MANAGED only: the network's IPv4 subnet in CIDR form; the host side has its first address
    subnet: str = ""
    #: MANAGED only: this VM's fixed IPv4 address inside ``subnet`` (a DHCP host entry)
    address: str = ""
    #: MANAGED only: names the network's DNS answers with ``address`` (e.g. a plan's service name)
    dns_names: tuple[str, ...] = ()


class ShareDriver(enum.Enum):
    """How a shared folder reaches the guest."""

    NINE_P = 1
    VIRTIOFS = 2


@dataclass(frozen=True)
class SharedFolder:
    """A host folder (on the agent's host) shared into the guest, mounted at ``mount`` when given."""

    host_path: str
    tag: str
    read_only: bool = False
    mount: str = ""
    driver: ShareDriver = ShareDriver.NINE_P


@dataclass(frozen=True)
class CloudInit:
    """
    NoCloud inputs. ``user_data`` can carry passwords and keys: it is a :class:`Secret`.

    With a spec of version 2, ``user_data`` is extra cloud-config merged into what the agent renders
    from ``auth`` and ``provision``; ``detach_seed_after_boot`` makes the agent detach and delete the
    seed once the guest reports cloud-init done.
    """

    user_data: Secret = field(default_factory=lambda: Secret(""))
    meta_data: str = ""
    network_config: str = ""
    detach_seed_after_boot: bool = False

    def __post_init__(self) -> None:
        # a plain string (older callers, tests) is wrapped, so the field is a Secret whatever was passed
        if not isinstance(self.user_data, Secret):
            object.__setattr__(self, "user_data", Secret(self.user_data))


class AuthMethod(enum.Enum):
    """How the guest user logs in (mirrors ``clonebox.type.v1.AuthMethod``)."""

    SSH_KEY = 1
    PASSWORD = 2
    BOTH = 3
    ONE_TIME_PASSWORD = 4

    @property
    def uses_password(self) -> bool:
        """Whether this method sets a password (and so enables SSH password login)."""
        return self is not AuthMethod.SSH_KEY

    @property
    def uses_keys(self) -> bool:
        """Whether this method installs SSH public keys."""
        return self in (AuthMethod.SSH_KEY, AuthMethod.BOTH)


@dataclass(frozen=True)
class Auth:
    """
    The guest's login user.

    The spec file names key sources and a password *reference*; the CLI resolves them on the
    requester's machine, so a request carries only public keys (``ssh_authorized_keys``) and a
    SHA-512-crypt hash (``password_hash``), never a password. ``secret_refs`` names the references
    that were resolved (for the audit log, never values). With no key at all the agent generates a
    per-VM ed25519 key pair.
    """

    user: str = "clonebox"
    method: AuthMethod = AuthMethod.SSH_KEY
    ssh_keys: tuple[str, ...] = ()
    password: str = ""
    ssh_authorized_keys: tuple[str, ...] = ()
    password_hash: Secret = field(default_factory=lambda: Secret(""))
    secret_refs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.password_hash, Secret):
            object.__setattr__(self, "password_hash", Secret(self.password_hash))

    @property
    def needs_generated_key(self) -> bool:
        """Whether the agent must generate a key pair (a key method, and no key given)."""
        return self.method.uses_keys and not self.ssh_authorized_keys


@dataclass(frozen=True)
class Provision:
    """What cloud-init installs and runs on first boot."""

    packages: tuple[str, ...] = ()
    snap_packages: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    post_commands: tuple[str, ...] = ()


@dataclass(frozen=True)
class VmSpec:
    """Desired shape of one VM."""

    name: str
    vcpus: int = 1
    memory_mib: int = 512
    disks: tuple[DiskSpec, ...] = ()
    kernel_boot: KernelBoot | None = None
    network: NetworkSpec = NetworkSpec()
    shared_folders: tuple[SharedFolder, ...] = ()
    cloud_init: CloudInit | None = None
    labels: tuple[tuple[str, str], ...] = ()
    auth: Auth | None = None
    provision: Provision | None = None
    health_checks: tuple[Probe, ...] = ()

    @property
    def renders_user_data(self) -> bool:
        """True for a version-2 spec: the agent renders user-data from ``auth`` and ``provision``."""
        return self.auth is not None

    @property
    def has_seed(self) -> bool:
        """Whether the VM gets a cloud-init NoCloud seed."""
        return self.cloud_init is not None or self.auth is not None

    @property
    def own_disks(self) -> tuple[DiskSpec, ...]:
        """The disks that belong to this VM (not agent volumes): what its snapshots and exports hold."""
        return tuple(d for d in self.disks if not d.volume)

    def resources(self) -> Resources:
        """What placement reserves for this VM (disk counts each disk's virtual size)."""
        return Resources(self.vcpus, self.memory_mib, sum(d.size_mib for d in self.disks))

    def label_dict(self) -> dict[str, str]:
        """Labels as a dict."""
        return dict(self.labels)


@dataclass(frozen=True)
class IpAddress:
    """One guest address."""

    interface: str
    address: str
    prefix: int
    source: str


@dataclass(frozen=True)
class Vm:
    """A VM as observed on its host."""

    name: str
    host: str
    state: VmState
    spec: VmSpec
    uuid: str = ""
    addresses: tuple[IpAddress, ...] = ()
    create_time: datetime | None = None
    update_time: datetime | None = None
    state_reason: str = ""

    def observed(self) -> tuple[VmState, str, tuple[IpAddress, ...], str]:
        """What its host reports about the VM (state, uuid, addresses, state reason): equal means nothing to record."""
        return (self.state, self.uuid, tuple(self.addresses), self.state_reason)


@dataclass(frozen=True)
class Revision:
    """A point in an agent's event history."""

    epoch: int
    sequence: int

    def covers(self, event: Revision) -> bool:
        """
        Whether a record at this revision already says what an agent event at ``event`` says.

        An event at or before this point is covered. Epochs grow with every agent start, so an event of
        a lower epoch comes from an agent process that has ended.
        """
        return event.epoch < self.epoch or (event.epoch == self.epoch and event.sequence <= self.sequence)


@dataclass(frozen=True)
class HypervisorInfo:
    """What an agent runs on."""

    uri: str
    libvirt_version: str = ""
    hypervisor_version: str = ""
    domain_type: str = "qemu"
    domain_type_reason: str = ""
    capabilities: tuple[str, ...] = ()
    cpu_model: str = ""


@dataclass(frozen=True)
class HostInfo:
    """What an agent reports about its host."""

    name: str
    capacity: Resources
    allocatable: Resources
    hypervisor: HypervisorInfo
    serving: bool = True
    not_serving_reason: str = ""


@dataclass(frozen=True)
class Host:
    """A host as the controller records it."""

    name: str
    address: str
    capacity: Resources
    allocatable: Resources
    allocated: Resources
    hypervisor: HypervisorInfo
    state: HostState
    cordoned: bool = False
    last_heartbeat: datetime | None = None
    vm_count: int = 0
    agent_epoch: int = 0


@dataclass(frozen=True)
class HostEndpoint:
    """What talking to a host's agent needs: its name, where it listens, and whether it is reachable."""

    name: str
    address: str
    state: HostState


@dataclass(frozen=True)
class Operation:
    """A long-running mutation tracked by the controller."""

    id: str
    kind: str
    target: str
    request_id: str = ""
    step: str = ""
    progress: int = 0
    done: bool = False
    error_code: str = ""
    error_reason: str = ""
    error_message: str = ""
    error_metadata: dict[str, str] = field(default_factory=dict)
    result_vm: Vm | None = None
    create_time: datetime | None = None
    update_time: datetime | None = None
    #: inputs the operation needs to run or resume (e.g. stop timeout)
    params: dict[str, str] = field(default_factory=dict)


class StepState(enum.StrEnum):
    """Where one step of a journaled transaction stands."""

    PLANNED = "planned"  # recorded with its undo, about to act (a crash here leaves at most an orphan)
    DONE = "done"  # acted; the identity of what it made is recorded
    UNDONE = "undone"  # rolled back (or there was nothing of it to remove)
    UNDO_FAILED = "undo_failed"  # the undo raised; the artifact may remain (the sweep reports it)


@dataclass(frozen=True)
class TransactionStep:
    """One step of a journaled transaction: how to undo it, and what it made."""

    n: int
    name: str
    undo: Mapping[str, str]
    identity: Mapping[str, str] | None
    state: StepState


class TransactionState(enum.StrEnum):
    """Where a journaled multi-step change stands."""

    OPEN = "open"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class Transaction:
    """A journaled multi-step change on an agent (``host`` is filled in when it leaves the agent)."""

    id: str
    kind: str
    target: str
    request_id: str
    state: TransactionState
    error: str = ""
    created: datetime | None = None
    finished: datetime | None = None
    steps: tuple[TransactionStep, ...] = ()
    host: str = ""


@dataclass(frozen=True)
class Orphan:
    """What a VM without a domain left behind on a host, and whether the sweep removed it."""

    host: str
    vm: str
    paths: tuple[str, ...]
    removed: bool = False


@dataclass(frozen=True)
class CreatePlan:
    """What a create would do (``--dry-run``): the steps in order and the domain XML, nothing made."""

    steps: tuple[str, ...]
    domain_xml: str
    host: str = ""
