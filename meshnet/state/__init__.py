"""What the kernel holds, read back and compared with a plan: iptables-save output
(`iptables_save`) and nft listings (`nft_listing`)."""
