from meshnet.cni.plugin.main import main

main()
