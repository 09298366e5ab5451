"""Sans-I/O MQTT 3.1.1 and 5.0: packets, codec, topics (no sockets in here but server.py)."""
