"""MQTT transport (docs/mqtt.md): `adapter` turns messages into commands and sends acks and
replies, `connection` runs the broker link (connect, reconnect, reload) and `client` is
paho's client with a leaner receive path; the policies are pure and tested without a broker:
`topics` (building and parsing topics), `status` (when the retained status is republished),
`link` (connect, reconnect, protocol version), `inbox` (flow control).

The package imports nothing itself, so `agent.mqtt.topics` can be used without loading paho;
the daemon imports `agent.mqtt.adapter` only when MQTT is enabled.
"""
