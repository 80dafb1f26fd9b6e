"""Apache Kafka itself as a local child process: KRaft mode from the jars on Maven Central.

Production runs Apache Kafka; the tests and `gpumeter up --broker kafka` run the same broker
without Docker: `java -cp 'lib/*' kafka.Kafka server.properties`, with its storage formatted
once per data directory. The jars are fetched once into `build/kafka/<version>/lib` from the pom
in `deploy/kafka/pom.xml` (which pins the version), with Maven when it is there; as root with
apt-get, Maven and a Java runtime are installed when missing.

A `KafkaCluster` of one node is one process in combined mode (broker and controller); of three,
three processes that are each broker and controller (a quorum of three voters), with replication
factor 3 and `min.insync.replicas=2` for every topic.

With `netns=True` (root and iproute2 needed) each node runs in a network namespace of its own,
joined to this host by a veth pair on a bridge in a private /24 made for the cluster (10.231.X.0),
and listens on its own address there. `isolate(n)` takes node n's link down: no client, broker or
controller reaches it and it reaches none, both ways, as a real network partition; the quorum
elects another controller if it led, fences it, and its partitions' leadership moves.
`reconnect(n)` brings the link up again. (A TCP proxy per node could not do this: since KIP-853 a
KRaft leader hands its followers its own controller listener's address, so the followers' quorum
traffic bypasses any proxy between them.) `stop()` removes the namespaces and the bridge.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpumeter.localstack import free_port, stop_process, wait_for_port

__all__ = ["KAFKA_VERSION", "KafkaCluster", "ensure_kafka_jars", "kafka_version"]

REPO = Path(__file__).resolve().parent.parent
POM = REPO / "deploy" / "kafka" / "pom.xml"


def kafka_version(pom: Path = POM) -> str:
    """The Kafka version the pom pins: the one the tests, compose and k8s use."""
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", pom.read_text())
    if found is None:
        raise RuntimeError(f"{pom} names no <kafka.version>")
    return found.group(1).strip()


KAFKA_VERSION = kafka_version()

LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c{1})%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = out
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
logger.broker.name = kafka.server.BrokerServer
logger.broker.level = INFO
"""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ensure_kafka_jars(build_dir: Path | None = None) -> Path:
    """The folder of the pinned Kafka's jars, fetched from Maven Central the first time.

    Copied into a temporary folder and renamed when complete: an interrupted fetch leaves no
    half-filled folder that a later start would take for the broker."""
    build_dir = (build_dir or REPO / "build" / "kafka").resolve()
    lib = build_dir / KAFKA_VERSION / "lib"
    if (lib / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
        return lib
    needed = {"java": "openjdk-17-jre-headless", "mvn": "maven"}
    if any(shutil.which(name) is None for name in needed):
        # Installed as root with apt-get, as the other Debian packages the project uses.
        script = REPO / "scripts" / "ensure-system-packages.sh"
        subprocess.run(["bash", str(script), *(f"{c}={p}" for c, p in needed.items())], check=True)
        missing = [name for name in needed if shutil.which(name) is None]
        if missing:
            raise RuntimeError(
                f"Apache Kafka needs {' and '.join(missing)} (Debian: "
                f"{' '.join(needed[m] for m in missing)}), or KAFKA_BOOTSTRAP_SERVERS naming a "
                "running broker"
            )
    _say(f"fetching Apache Kafka {KAFKA_VERSION} from Maven Central into {lib} (once)...")
    partial = lib.with_name(f"lib.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.monotonic()
    result = subprocess.run(
        [
            "mvn",
            "-q",
            "-B",
            "-f",
            str(POM),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={partial}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise RuntimeError(f"fetching Apache Kafka {KAFKA_VERSION} failed:\n{tail}")
    lib.parent.mkdir(parents=True, exist_ok=True)
    try:
        partial.rename(lib)
    except OSError:  # another process finished first: theirs is as good
        shutil.rmtree(partial, ignore_errors=True)
    jars = len(list(lib.glob("*.jar")))
    _say(f"fetched {jars} jars in {time.monotonic() - started:.0f} s")
    return lib


@dataclass(frozen=True)
class SecureListeners:
    """TLS and SASL listeners beside each node's PLAINTEXT one (which stays for the brokers' own
    traffic): SSL on `ssl_port` and SASL_SSL on `sasl_port`, with PLAIN, SCRAM-SHA-256 and
    SCRAM-SHA-512 for `users` (name -> password; the SCRAM credentials are written when the
    storage is formatted). `keystore` is a PEM file holding the node's private key and
    certificate; `truststore` the CA's certificate (PEM)."""

    keystore: Path
    truststore: Path
    users: dict[str, str]


@dataclass
class KafkaNode:
    node_id: int
    data_dir: Path
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    ssl_port: int = field(default_factory=free_port)
    sasl_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    host: str = "127.0.0.1"
    namespace: str | None = None  # its network namespace, and the host side of its veth pair
    link: str | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "kafka.log"


@dataclass
class KafkaCluster:
    """`size` KRaft nodes on 127.0.0.1 (or each in a network namespace of its own, `netns`),
    each broker and controller, data under `data_dir`."""

    data_dir: Path
    size: int = 1
    heap_mb: int = 512
    netns: bool = False
    nodes: list[KafkaNode] = field(default_factory=list)
    # Told of every node process started (the local stack hands it to its guardian).
    on_spawn: Callable[[subprocess.Popen], None] | None = None
    bridge: str | None = None
    isolated: set[int] = field(default_factory=set)
    secure: SecureListeners | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        if not self.nodes:
            self.nodes = [
                KafkaNode(n, self.data_dir / f"node-{n}") for n in range(1, self.size + 1)
            ]

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"{node.host}:{node.port}" for node in self.nodes)

    def secure_bootstrap_servers(self, protocol: str) -> str:
        """The nodes' SSL or SASL_SSL listeners (with `secure` set)."""
        if self.secure is None:
            raise RuntimeError("this cluster has no secure listeners")
        port = {"SSL": "ssl_port", "SASL_SSL": "sasl_port"}[protocol]
        return ",".join(f"{node.host}:{getattr(node, port)}" for node in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        return next(node for node in self.nodes if node.node_id == node_id)

    def _config(self, node: KafkaNode) -> str:
        replicas = min(self.size, 3)
        voters = ",".join(f"{n.node_id}@{n.host}:{n.controller_port}" for n in self.nodes)
        config = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": (
                f"PLAINTEXT://{node.host}:{node.port},"
                f"CONTROLLER://{node.host}:{node.controller_port}"
            ),
            "advertised.listeners": f"PLAINTEXT://{node.host}:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(node.data_dir / "data"),
            "offsets.topic.replication.factor": str(replicas),
            "offsets.topic.num.partitions": "8",
            "transaction.state.log.replication.factor": str(replicas),
            "transaction.state.log.min.isr": str(min(replicas, 2)),
            "default.replication.factor": str(replicas),
            "min.insync.replicas": str(min(replicas, 2)),
            # A consumer group's first member starts at once (the default waits 3 s for others).
            "group.initial.rebalance.delay.ms": "0",
            # Local profiles keep sessions short (a SIGKILLed member's partitions move within
            # seconds); the broker's default floor is 6 s.
            "group.min.session.timeout.ms": "1000",
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "log.retention.hours": "-1",
        }
        if self.secure is not None:
            config.update(self._secure_config(node, self.secure))
        return "".join(f"{key}={value}\n" for key, value in config.items())

    @staticmethod
    def _secure_config(node: KafkaNode, secure: SecureListeners) -> dict[str, str]:
        plain_users = " ".join(
            f'user_{name}="{password}"' for name, password in secure.users.items()
        )
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        return {
            "listeners": (
                f"PLAINTEXT://{node.host}:{node.port},"
                f"SSL://{node.host}:{node.ssl_port},"
                f"SASL_SSL://{node.host}:{node.sasl_port},"
                f"CONTROLLER://{node.host}:{node.controller_port}"
            ),
            "advertised.listeners": (
                f"PLAINTEXT://{node.host}:{node.port},"
                f"SSL://{node.host}:{node.ssl_port},"
                f"SASL_SSL://{node.host}:{node.sasl_port}"
            ),
            "listener.security.protocol.map": (
                "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SSL:SSL,SASL_SSL:SASL_SSL"
            ),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(secure.keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(secure.truststore),
            "ssl.client.auth": "none",
            "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
            "listener.name.sasl_ssl.plain.sasl.jaas.config": (
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                + plain_users
                + ";"
            ),
            "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config": scram,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": scram,
        }

    def _format(self, node: KafkaNode, lib: Path, cluster_id: str) -> None:
        if (node.data_dir / "data" / "meta.properties").is_file():
            return  # formatted before: a restart keeps its topics
        result = subprocess.run(
            [
                "java",
                "-cp",
                f"{lib}/*",
                "kafka.tools.StorageTool",
                "format",
                "--ignore-formatted",
                f"--cluster-id={cluster_id}",  # an id may start with "-"
                f"--config={node.data_dir / 'server.properties'}",
                *(
                    f"--add-scram={mechanism}=[name={name},password={password}]"
                    for name, password in (self.secure.users.items() if self.secure else ())
                    for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512")
                ),
            ],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"formatting Kafka storage of node {node.node_id} failed:\n"
                + (result.stdout + result.stderr)[-2000:]
            )

    def _cluster_id(self) -> str:
        path = self.data_dir / "cluster-id"
        if path.is_file():
            return path.read_text().strip()
        # A Kafka cluster id is 16 random bytes in URL-safe base64 without padding.
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        path.write_text(cluster_id + "\n")
        return cluster_id

    def _make_network(self) -> None:
        """A bridge on this host with a private /24 (10.231.X.0, X free here) and, per node, a
        namespace joined to it by a veth pair; the node listens on 10.231.X.(10 + its id)."""
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise RuntimeError(
                "a Kafka cluster in network namespaces needs root and iproute2 (`ip`)"
            )
        taken = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
        for _ in range(100):
            subnet = f"10.231.{secrets.randbelow(256)}"
            if f"{subnet}." not in taken:
                break
        else:
            raise RuntimeError("no free 10.231.X.0/24 for the cluster's network")
        tag = secrets.token_hex(3)
        self.bridge = f"gpmk{tag}"
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for node in self.nodes:
            node.namespace = node.link = f"gpmk{tag}n{node.node_id}"
            node.host = f"{subnet}.{10 + node.node_id}"
            node.port, node.controller_port = 9092, 9093
            _ip("netns", "add", node.namespace)
            _ip("link", "add", node.link, "type", "veth", "peer", "name", "eth0", "netns",
                node.namespace)  # fmt: skip
            _ip("link", "set", node.link, "master", self.bridge)
            _ip("link", "set", node.link, "up")
            _ip("-n", node.namespace, "addr", "add", f"{node.host}/24", "dev", "eth0")
            _ip("-n", node.namespace, "link", "set", "eth0", "up")
            _ip("-n", node.namespace, "link", "set", "lo", "up")

    def remove_network(self) -> None:
        """Delete the namespaces and the bridge (`stop` does; so does the local stack, whose
        guardian stops the node processes itself)."""
        for node in self.nodes:
            if node.namespace is not None:
                subprocess.run(["ip", "netns", "del", node.namespace], capture_output=True)
        if self.bridge is not None:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            self.bridge = None

    def start(self, timeout_s: float = 90.0) -> KafkaCluster:
        lib = ensure_kafka_jars()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.netns and self.bridge is None:
            try:
                self._make_network()
            except (RuntimeError, OSError):
                self.remove_network()
                raise
        cluster_id = self._cluster_id()
        for node in self.nodes:
            node.data_dir.mkdir(parents=True, exist_ok=True)
            (node.data_dir / "server.properties").write_text(self._config(node))
            (node.data_dir / "log4j2.properties").write_text(LOG4J2)
            self._format(node, lib, cluster_id)
        for node in self.nodes:
            self.start_node(node.node_id, wait=False)
        for node in self.nodes:
            assert node.process is not None
            try:
                wait_for_port(node.port, timeout_s, process=node.process, host=node.host)
            except (RuntimeError, TimeoutError) as error:
                self.stop()
                tail = node.log_path.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(
                    f"Kafka node {node.node_id}: {error}\n" + "\n".join(tail)
                ) from None
        return self

    def start_node(self, node_id: int, wait: bool = True) -> None:
        node = self.node(node_id)
        lib = ensure_kafka_jars()
        log = open(node.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        # `ip netns exec` runs java itself in the node's namespace (same pid, same environment).
        namespace = ["ip", "netns", "exec", node.namespace] if node.namespace else []
        node.process = subprocess.Popen(
            [
                *namespace,
                "java",
                f"-Xmx{self.heap_mb}m",
                "-Xms64m",
                "-XX:+UseSerialGC",
                "-Xss512k",
                f"-Dlog4j2.configurationFile={node.data_dir / 'log4j2.properties'}",
                "-cp",
                f"{lib}/*",
                "kafka.Kafka",
                str(node.data_dir / "server.properties"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if self.on_spawn is not None:
            self.on_spawn(node.process)
        if wait:
            wait_for_port(node.port, 90.0, process=node.process, host=node.host)

    def kill_node(self, node_id: int) -> None:
        """SIGKILL one node, as a crash would (its data directory stays for a restart)."""
        node = self.node(node_id)
        if node.process is not None and node.process.poll() is None:
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait(30)

    def isolate(self, node_id: int) -> None:
        """Cut node `node_id` off from everything, both ways (see the module)."""
        _ip("link", "set", self._link(node_id), "down")
        self.isolated.add(node_id)

    def reconnect(self, node_id: int) -> None:
        _ip("link", "set", self._link(node_id), "up")
        self.isolated.discard(node_id)

    def _link(self, node_id: int) -> str:
        link = self.node(node_id).link
        if link is None:
            raise RuntimeError("only a cluster started with netns=True can isolate a node")
        return link

    @property
    def processes(self) -> list[subprocess.Popen]:
        return [node.process for node in self.nodes if node.process is not None]

    def stop(self) -> None:
        running = [n for n in self.nodes if n.process is not None and n.process.poll() is None]
        for node in running:  # all at once: a controlled shutdown waits for the others
            assert node.process is not None
            node.process.send_signal(signal.SIGTERM)
        for node in running:
            assert node.process is not None
            stop_process(node.process, timeout_s=30.0)
        self.remove_network()


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


if __name__ == "__main__":
    # `python -m gpumeter.kafkabroker fetch`: the pinned Kafka's jars, fetched once (make test).
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m gpumeter.kafkabroker fetch")
    print(f"Apache Kafka {KAFKA_VERSION}: {ensure_kafka_jars()}")
