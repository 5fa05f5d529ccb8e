"""Entry point of the standalone `meshnet-cni` executable (see build.sh)."""

from meshnet.cni.plugin.main import main

if __name__ == "__main__":
    main()
