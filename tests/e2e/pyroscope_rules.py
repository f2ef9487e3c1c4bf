"""What Pyroscope does with an OTLP profiles request, as a test can check it.

The rules are those of Grafana Pyroscope v2.2 (its OTLP ingest converter and
its default validation limits), read from its source; no Pyroscope runs in
these tests. Pyroscope 1.20 and later follow the same rules, except that
1.x turns the dots of label names into underscores.

`series_of(request, now_ns)` converts a decoded
`ExportProfilesServiceRequest` the way Pyroscope does, profile by profile,
and returns each profile's series with the reason it would be refused, if
any. A request is answered 400 as a whole when one profile is refused.
"""

from dataclasses import dataclass, field

PYROSCOPE_VERSION = "v2.2"

MAX_LABEL_NAMES_PER_SERIES = 30
MAX_LABEL_VALUE_LENGTH = 2048
MAX_LABEL_NAME_LENGTH = 1024
MAX_SAMPLES_PER_PROFILE = 16_000
MAX_PROFILE_BYTES = 4 << 20
INGESTION_WINDOW_PAST_NS = 3600 * 10**9
INGESTION_WINDOW_FUTURE_NS = 600 * 10**9
# Sample attributes that stay per sample instead of making series.
PER_SAMPLE = {"span_id", "trace_id", "profile_id"}


@dataclass
class ConvertedProfile:
    name: str
    profile_type: str
    # Each distinct label set of the profile's samples, as sorted pairs.
    series: set = field(default_factory=set)
    refused: list = field(default_factory=list)


def _any_value(value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


def _label_value(value):
    """A string or int attribute as Pyroscope writes it into a label; a
    one-element array as its element; anything else is no label."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return str(value.int_value)
    if kind == "array_value" and len(value.array_value.values) == 1:
        return _label_value(value.array_value.values[0])
    return None


def series_name(type_name, unit, period_type, period_unit, period):
    """`__name__` from `type:unit:periodType:periodUnit`; the period counts
    only when the period is not 0."""
    if period == 0:
        period_type = period_unit = ""
    if (type_name, unit, period_type, period_unit) == ("off_cpu", "nanoseconds", "", ""):
        return "off_cpu"
    if (type_name, unit, period_type, period_unit) == ("samples", "count", "cpu", "nanoseconds"):
        return "process_cpu"
    return period_type


def _labels(attributes) -> dict:
    labels = {}
    for kv in attributes:
        value = _label_value(kv.value)
        if value is not None:
            labels[kv.key] = value
    return labels


def series_of(request, now_ns):
    dictionary = request.dictionary
    strings = dictionary.string_table
    converted = []
    for resource_profiles in request.resource_profiles:
        resource = _labels(resource_profiles.resource.attributes)
        service = resource.get("service.name") or f"unknown_service:{resource.get('process.executable.name', '')}"
        for scope_profiles in resource_profiles.scope_profiles:
            scope = _labels(scope_profiles.scope.attributes)
            for profile in scope_profiles.profiles:
                converted.append(_convert(profile, dictionary, strings, resource, scope, service, now_ns))
    return converted


def _convert(profile, dictionary, strings, resource, scope, service, now_ns):
    sample_type = profile.sample_type
    type_name, unit = strings[sample_type.type_strindex], strings[sample_type.unit_strindex]
    period_type = period_unit = ""
    if profile.HasField("period_type"):
        period_type = strings[profile.period_type.type_strindex]
        period_unit = strings[profile.period_type.unit_strindex]
    name = series_name(type_name, unit, period_type, period_unit, profile.period)
    shown_period = (period_type, period_unit) if profile.period else ("", "")
    result = ConvertedProfile(name=name, profile_type=":".join([name, type_name, unit, *shown_period]))
    if not name:
        result.refused.append(f"empty __name__ from {type_name}/{unit} with period type {period_type}/{period_unit}")
    if len(profile.samples) > MAX_SAMPLES_PER_PROFILE:
        result.refused.append(f"{len(profile.samples)} samples, more than {MAX_SAMPLES_PER_PROFILE}")
    if not now_ns - INGESTION_WINDOW_PAST_NS <= profile.time_unix_nano <= now_ns + INGESTION_WINDOW_FUTURE_NS:
        result.refused.append(f"time {profile.time_unix_nano} outside the ingestion window around {now_ns}")
    # What Pyroscope keeps of a profile is far smaller than the request
    # less the original payload it ignores; that bounds it.
    stripped = type(profile)()
    stripped.CopyFrom(profile)
    stripped.original_payload = b""
    size = stripped.ByteSize() + dictionary.ByteSize()
    if size > MAX_PROFILE_BYTES:
        result.refused.append(f"{size} bytes, more than {MAX_PROFILE_BYTES}")

    base = {"__name__": name, "__delta__": "false", "__otel__": "true", **resource, **scope, "service_name": service}
    for sample in profile.samples:
        labels = dict(base)
        for index in sample.attribute_indices:
            if not 0 < index < len(dictionary.attribute_table):
                result.refused.append(f"attribute index {index} out of range: the profile would be dropped silently")
                continue
            attribute = dictionary.attribute_table[index]
            key = strings[attribute.key_strindex]
            value = _label_value(attribute.value)
            if key not in PER_SAMPLE and value is not None:
                labels[key] = value
        if sample.link_index:
            link = dictionary.link_table[sample.link_index]
            if len(link.span_id) != 8 or len(link.trace_id) != 16:
                result.refused.append(f"link {sample.link_index} is not a span id and a trace id")
        result.series.add(tuple(sorted(labels.items())))
    for series in result.series:
        if len(series) > MAX_LABEL_NAMES_PER_SERIES:
            result.refused.append(f"{len(series)} label names, more than {MAX_LABEL_NAMES_PER_SERIES}: {[k for k, _ in series]}")
        for key, value in series:
            if len(key.encode()) > MAX_LABEL_NAME_LENGTH:
                result.refused.append(f"label name {key[:40]}... is longer than {MAX_LABEL_NAME_LENGTH} bytes")
            if len(value.encode()) > MAX_LABEL_VALUE_LENGTH:
                result.refused.append(f"label {key} is {len(value.encode())} bytes, more than {MAX_LABEL_VALUE_LENGTH}")
    return result


def assert_pyroscope_accepts(request, now_ns):
    """Every profile of the request passes, and its series are few: no more
    than its thread names times its lock kinds (or system calls), in the
    states the threads were seen in. Returns the converted profiles."""
    converted = series_of(request, now_ns)
    assert converted, "no profile in the request"
    for profile in converted:
        assert not profile.refused, f"Pyroscope {PYROSCOPE_VERSION} would refuse {profile.profile_type}: {profile.refused}"
        seen = [dict(series) for series in profile.series]
        names = {labels.get("thread.name") for labels in seen}
        kinds = {labels.get("lock.kind", labels.get("syscall")) for labels in seen}
        states = {labels.get("thread.state") for labels in seen}
        assert len(profile.series) <= len(names) * len(kinds) * len(states), (profile.profile_type, seen)
    return converted
