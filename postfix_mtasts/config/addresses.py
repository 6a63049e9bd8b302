"""Listen addresses, nameservers and Sentinels: the strings a configuration
names places with, parsed into values or refused with one line."""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Final

from postfix_mtasts.config.model import (
    SYSTEMD_NAME_MAX,
    UNIX_PATH_MAX,
    ConfigError,
    ListenAddress,
    Nameserver,
)
from postfix_mtasts.config.text import show

#: Permission bits written in octal, as in "0660".
OCTAL_MODE: Final = re.compile(r"0?[0-7]{3}")
_HOSTNAME_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_DECIMAL: Final = re.compile(r"[0-9]{1,5}")


def parse_listen_address(text: str) -> ListenAddress:
    """Parse "inet:HOST:PORT", "unix:/PATH[:mode=0660]" or "systemd:N|NAME".

    Raises ConfigError whose message describes the problem (without a key),
    so the same check serves the file and a reload.
    """
    if not isinstance(text, str):
        raise ConfigError(f"must be a listen address string, got {show(text)}")
    kind, sep, rest = text.partition(":")
    if sep and kind == "inet":
        return _parse_inet(text, rest)
    if sep and kind == "unix":
        return _parse_unix(text, rest)
    if sep and kind == "systemd":
        return _parse_systemd(text, rest)
    raise ConfigError(f'must be "inet:HOST:PORT", "unix:/PATH" or "systemd:NAME", got {show(text)}')


# --- listen addresses ---------------------------------------------------------


def _parse_inet(text: str, rest: str) -> ListenAddress:
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or not tail.startswith(":"):
            raise ConfigError(f'must be "inet:[IPv6]:PORT", got {show(text)}')
        port_text = tail[1:]
        if not _is_ipv6(host):
            raise ConfigError(f"{show(host)} in brackets is not an IPv6 address, got {show(text)}")
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon or not host:
            raise ConfigError(f'must be "inet:HOST:PORT", got {show(text)}')
        if ":" in host:
            raise ConfigError(f'put an IPv6 address in brackets, "inet:[::1]:PORT", got {show(text)}')
        if not (_is_ipv4(host) or _is_hostname(host)):
            raise ConfigError(f"{show(host)} is not an IP address or host name, got {show(text)}")
    return ListenAddress(kind="inet", host=host, port=_port(port_text, text))


def _parse_unix(text: str, rest: str) -> ListenAddress:
    path, mode_text = rest, None
    match = re.fullmatch(r"(.*):mode=([^:]*)", rest, flags=re.DOTALL)
    if match:
        path, mode_text = match.group(1), match.group(2)
    if not path.startswith("/"):
        raise ConfigError(f'the socket path must be absolute, "unix:/PATH", got {show(text)}')
    if "\0" in path:
        raise ConfigError(f"the socket path contains a NUL character, got {show(text)}")
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise ConfigError(f"the socket path is longer than {UNIX_PATH_MAX} bytes, got {show(text)}")
    mode = None
    if mode_text is not None:
        if not OCTAL_MODE.fullmatch(mode_text):
            raise ConfigError(f'mode must be octal permission bits like "0660", got {show(text)}')
        mode = int(mode_text, 8)
    return ListenAddress(kind="unix", path=path, mode=mode)


def _parse_systemd(text: str, rest: str) -> ListenAddress:
    if re.fullmatch(r"[0-9]{1,4}", rest):
        return ListenAddress(kind="systemd", systemd_index=int(rest))
    if (
        rest
        and len(rest) <= SYSTEMD_NAME_MAX
        and ":" not in rest
        and all(" " < char < "\x7f" for char in rest)
    ):
        return ListenAddress(kind="systemd", systemd_name=rest)
    raise ConfigError(
        'must be "systemd:N" (index) or "systemd:NAME" (FileDescriptorName=, printable ASCII,'
        f" no colon), got {show(text)}"
    )


def _port(port_text: str, text: str) -> int:
    if _DECIMAL.fullmatch(port_text) and 1 <= int(port_text) <= 65535:
        return int(port_text)
    raise ConfigError(f"the port must be a number from 1 to 65535, got {show(text)}")


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _is_hostname(text: str) -> bool:
    labels = text.rstrip(".").split(".")
    if len(text) > 253 or all(label.isdigit() for label in labels):
        return False
    return all(_HOSTNAME_LABEL.fullmatch(label) for label in labels)




def parse_nameserver(text: str) -> Nameserver:
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if bracket and _is_ipv6(host) and (not tail or tail.startswith(":")):
            return Nameserver(host, _port(tail[1:], text) if tail else 53)
    elif _is_ipv4(text) or _is_ipv6(text):
        return Nameserver(text)
    else:
        host, _, port_text = text.rpartition(":")
        if _is_ipv4(host):
            return Nameserver(host, _port(port_text, text))
    raise ConfigError(f'must be "IP", "IP:PORT" or "[IPv6]:PORT", got {show(text)}')


def parse_sentinel(text: str) -> str:
    """A Sentinel as "host:port" (IPv6 in brackets); kept as text for the Redis backend."""
    host, colon, port_text = text.rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if colon and (_is_ipv4(bare) or _is_ipv6(bare) or _is_hostname(bare)):
        _port(port_text, text)
        return text
    raise ConfigError(f'must be "HOST:PORT", got {show(text)}')
