from meshnet.cni.plugin import main

main()
