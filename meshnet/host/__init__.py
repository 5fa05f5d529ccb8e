"""The machine: processes (`proc`), network namespaces and their locks (`netns`, `nslock`),
rtnetlink dumps (`netlink`), the real `System` the options ask (`system`), and the runtime
capture check of --run-validation (`capture_check`)."""
