from twisted.application.service import ServiceMaker

contentcache = ServiceMaker(
    "contentcache",
    "contentcache.tap",
    "Pull-through cache for npm and Go modules in a content-addressable store.",
    "contentcache",
)
