"""The `meshnet` commands: click's app (`app`), the click-free reader of Istio's argv
(`argv`), the command flows (`run`) and `meshnet demo` (`demo`)."""
