# cython: language_level=3
"""C-level declarations of deliveries.pyx: the wire tags of taskwheel.v1.ConsumeResponse and
Delivery (task.proto) it writes."""

# Tags: field number << 3 | wire type (0 varint, 2 length-delimited).
cdef enum:
    TAG_DELIVERIES = 0x0A       # ConsumeResponse.deliveries = 1
    TAG_TASK_ID = 0x0A          # Delivery.task_id = 1
    TAG_DELIVERY_ID = 0x12      # 2
    TAG_QUEUE = 0x1A            # 3
    TAG_PAYLOAD = 0x22          # 4
    TAG_FIRE_AT = 0x2A          # 5
    TAG_ATTEMPT = 0x30          # 6
    TAG_HEADERS = 0x3A          # 7
    TAG_MAX_ATTEMPTS = 0x40     # 8
    TAG_FIRED_AT = 0x4A         # 9
    TAG_LEASE_EXPIRES_AT = 0x52  # 10
    TAG_TRACEPARENT = 0x5A      # 11
    TAG_REDELIVERED = 0x60      # 12, a varint
    TAG_OWNER_EPOCH = 0x68      # 13, a varint
    TAG_MAP_KEY = 0x0A          # a map entry's key = 1
    TAG_MAP_VALUE = 0x12        # and value = 2
