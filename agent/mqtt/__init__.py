"""MQTT transport (docs/mqtt.md): `adapter` does the I/O with paho; the policies are pure and
tested without a broker: `topics` (building and parsing topics), `status` (when the retained
status is republished), `link` (connect, reconnect, protocol version), `inbox` (flow control).

The package imports nothing itself, so `agent.mqtt.topics` can be used without loading paho;
the daemon imports `agent.mqtt.adapter` only when MQTT is enabled.
"""
