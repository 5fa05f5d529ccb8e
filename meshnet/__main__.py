from meshnet.entry import main

main()
